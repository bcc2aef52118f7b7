"""Qt-free logic of the CDALSegmentation 3D Slicer module.

Works inside desktop 3D Slicer and in a plain Python process with PyPI's ``slicer-core``.
"""
