"""The module's parameter node (desktop Slicer's parameterNodeWrapper; widgets bind by ``SlicerParameterName``).

The two device combo boxes are filled from ``Device`` (labels from ``Device.label``) by Slicer's
QComboBoxToEnumConnector.
"""
import enum
from typing import Annotated, Union

from slicer import (vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode,
                    vtkMRMLVectorVolumeNode)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

from .logic import DEFAULT_MODEL


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}[self.value]


@parameterNodeWrapper
class CDALSegmentationParameterNode:
    # the input selector lists exactly these types (RGB images load as vector volumes); None: Slicer's Union rule
    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]
    roi: vtkMRMLMarkupsROINode
    model: str = DEFAULT_MODEL
    steps: Annotated[int, WithinRange(0, 16)] = 0
    samples: Annotated[int, WithinRange(1, 32)] = 5
    seed: Annotated[int, WithinRange(-1, 2147483647)] = -1
    device: Device = Device.AUTO
    showUncertainty: bool = True
    showAttention: bool = False
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    # results of the last run (each refers to the volume it was computed from)
    segmentation: vtkMRMLSegmentationNode
    uncertainty: vtkMRMLScalarVolumeNode
    attention: vtkMRMLScalarVolumeNode
    sliceTable: vtkMRMLTableNode
    volumeTable: vtkMRMLTableNode
    fineTuneSteps: Annotated[int, WithinRange(1, 100000)] = 300
    fineTuneMinutes: Annotated[float, WithinRange(0.0, 1440.0)] = 30.0
    fineTuneDevice: Device = Device.AUTO
    fineTuneName: str = ""
    keepTrainingData: bool = False
