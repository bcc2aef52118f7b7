"""Make the README screenshots from real Slicer rendering of the module's real output (no desktop Slicer).

Usage (from the repository root; one command writes every PNG in Resources/Screenshots/)::

    python3 -m venv .venv-render
    .venv-render/bin/pip install torch==2.13.0 "trame-slicer[standalone]==2.0.0" monai SimpleITK nibabel \\
        safetensors tqdm nilearn matplotlib
    .venv-render/bin/pip install --no-deps -e .
    OMP_NUM_THREADS=1 .venv-render/bin/python Resources/Screenshots/make_screenshots.py

Options: ``--out DIR`` (default: this folder), ``--samples N`` (default 5), ``--device cpu|cuda|auto``.
The model is the shipped ``hippocampus`` model (Resources/Models/hippocampus); set ``CDAL_SHIPPED_MODELS`` to use
another models folder.

How it works: PyPI's ``trame-slicer`` builds Slicer's slice and 3D views (MRML displayable managers, slice logic)
on top of PyPI's ``slicer-core`` and renders them offscreen with VTK's EGL render window (Mesa), no X and no
browser. The scene is wired like desktop Slicer (``slicer.mrmlScene``, ``slicer.modules.<name>.logic()``,
segmentation converter rules, see Testing/slicer/slicer_harness.py) so that the module's own Qt-free logic
(``CDALSegmentationLib.logic.CDALSegmentationLogic``) creates exactly the nodes a user gets: segmentation
(segment colours from the model card), uncertainty and attention volumes with the module's display settings
(Inferno, fixed window, low values transparent). Input: the ICBM152 2009a T1 template that ships inside nilearn
(loaded through an MRML storage node) with one markups ROI per hippocampus (boxes of ``cdal_core.demo``).
The rendered views are composed into captioned panels with matplotlib.

Outputs:
    segmentation.png  coronal + axial slices zoomed on the left hippocampus, segments (fill + outline) over T1
    uncertainty.png   same views, uncertainty overlay (foreground layer) + segment outlines
    attention.png     same views, attention overlay (foreground layer) + segment outlines
    3d.png            3D view: closed surfaces of both hippocampi with the T1 axial and coronal slices
"""
import argparse
import os
import sys
import time

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # offscreen, no X server

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "CDALSegmentation"))
sys.path.insert(0, os.path.join(REPO, "Testing", "slicer"))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

#: the module's default "Overlay opacity" (CDALSegmentation.py parameter node: overlayOpacity = 0.6)
OVERLAY_OPACITY = 0.6
VIEW_PX = 620  # each rendered slice view is VIEW_PX x VIEW_PX pixels
FOV_MM = 64.0  # field of view of the zoomed slice views
VIEW3D_PX = (1200, 760)
CAMERA_OFFSET_MM = (-80.0, 200.0, 230.0)  # 3D camera position relative to the focal point (anterior-superior-left)


def build_app():
    """trame-slicer application (scene + logics + view factories) wired like desktop Slicer for our logic."""
    import types

    import slicer
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory

    import slicer_harness

    slicer_harness.register_segmentation_converter_rules()
    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    slicer.mrmlScene = app.scene
    slicer.modules = types.SimpleNamespace(
        volumes=slicer_harness._ModuleProxy(app.volumes_logic),
        segmentations=slicer_harness._ModuleProxy(app.segmentations_logic),
        colors=slicer_harness._ModuleProxy(app.color_logic),
        markups=slicer_harness._ModuleProxy(app.markups_logic._logic),
    )
    return app


def add_roi(scene, name, centre, size):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetCenter(*centre)
    roi.SetSize(*size)
    roi.CreateDefaultDisplayNodes()
    return roi


def slice_image_first(view):
    """Draw the slice image before the displayable managers' 2D actors.

    trame-slicer adds its slice image actor (display location "background") only when the first volume is shown,
    after the displayable managers added theirs; 2D actors are drawn in list order, so semi-transparent segment
    fills were blended with black instead of the image. Desktop Slicer (CTK light box manager) adds the image actor
    first: restore that order.
    """
    renderer = view.first_renderer()
    image_actor = view._render_manager.image_actor
    props = [prop for prop in renderer.GetViewProps() if prop is not image_actor]
    for prop in props:
        renderer.RemoveViewProp(prop)
    renderer.RemoveViewProp(image_actor)
    renderer.AddViewProp(image_actor)
    for prop in props:
        renderer.AddViewProp(prop)


def grab(view):
    """Render a view offscreen and return its pixels as an (H, W, 3) uint8 array."""
    import vtk
    from vtk.util import numpy_support

    view.render()
    w2i = vtk.vtkWindowToImageFilter()
    w2i.SetInput(view.render_window())
    w2i.SetInputBufferTypeToRGB()
    w2i.ReadFrontBufferOff()
    w2i.Update()
    image = w2i.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.flipud(pixels)[:, :, :3].copy()


def labels_ras_points(result):
    """RAS coordinates (N, 3) of the segmented voxels of one result."""
    from CDALSegmentationLib import geometry

    k, j, i = np.nonzero(result.labelArray())
    ijk = np.stack([i, j, k, np.ones_like(i)]).astype(float)
    return geometry.ijkToRasArray(result.inputVolumeNode).dot(ijk)[:3].T


def make_slice_view(app, definition, volume, size):
    view = app.view_manager.create_view(definition)
    view.update_size(*size)
    view.render_window().SetSize(*size)
    view.set_background_volume_id(volume.GetID())
    view.fit_view_to_content()
    slice_image_first(view)
    return view


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=HERE, help="output folder (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    app = build_app()
    scene = app.scene

    from cdal_core.demo import BOX_MM, HIPPOCAMPUS_CENTRES, template_path
    from CDALSegmentationLib.logic import CDALSegmentationLogic, foregroundClasses
    from slicer_harness import load_volume
    from trame_slicer.views import ViewLayoutDefinition

    volume = load_volume(template_path(), scene=scene, name="MNI152 T1")
    logic = CDALSegmentationLogic()
    results = {}
    for side in ("left", "right"):
        roi = add_roi(scene, "ROI %s hippocampus" % side, HIPPOCAMPUS_CENTRES[side], BOX_MM)
        start = time.perf_counter()
        results[side] = logic.segment(volume, model="hippocampus", roiNode=roi, samples=args.samples, seed=0,
                                      device=args.device)
        roi.GetDisplayNode().SetVisibility(False)
        print("segmented %s hippocampus in %.1f s (%d voxels)" % (
            side, time.perf_counter() - start, int((results[side].labelArray() > 0).sum())), flush=True)
        # what the module's GUI does after a run (CDALSegmentationWidget.showResult)
        results[side].segmentationNode.CreateClosedSurfaceRepresentation()
    left = results["left"]
    if not np.any(left.labelArray()):
        raise SystemExit("the model found no hippocampus in the left ROI: nothing to show")
    classes = foregroundClasses(left.card)
    left_points = labels_ras_points(left)
    centre = left_points.mean(axis=0)
    print("left hippocampus centroid (RAS mm): %s" % np.round(centre, 1), flush=True)

    # ---- zoomed slice views ----------------------------------------------------------------------------------
    views = {}
    for name, definition in (("Coronal", ViewLayoutDefinition.coronal_view()),
                             ("Axial", ViewLayoutDefinition.axial_view())):
        view = make_slice_view(app, definition, volume, (VIEW_PX, VIEW_PX))
        node = view.get_view_node()
        node.JumpSliceByCentering(*centre)
        node.SetFieldOfView(FOV_MM, FOV_MM, node.GetFieldOfView()[2])
        views[name] = view
    for result in results.values():
        result.segmentationNode.GetDisplayNode().SetSliceIntersectionThickness(2)

    def set_fill(visible):
        for result in results.values():
            result.segmentationNode.GetDisplayNode().SetVisibility2DFill(visible)

    def set_foreground(node):
        for view in views.values():
            view.set_foreground_volume_id(node.GetID() if node is not None else None)
            view.set_foreground_opacity(OVERLAY_OPACITY)

    panels = {}
    set_foreground(None)
    panels["segmentation"] = {name: grab(view) for name, view in views.items()}
    set_fill(False)  # outlines only, so the overlay stays visible
    set_foreground(left.uncertaintyNode)
    panels["uncertainty"] = {name: grab(view) for name, view in views.items()}
    if left.attentionNode is not None:
        set_foreground(left.attentionNode)
        panels["attention"] = {name: grab(view) for name, view in views.items()}
    set_foreground(None)
    set_fill(True)

    # ---- 3D view: segment surfaces of both sides with T1 slices behind and below them --------------------------
    threed = None
    try:
        points = np.concatenate([labels_ras_points(r) for r in results.values() if np.any(r.labelArray())])
        low, high = points.min(axis=0), points.max(axis=0)
        for label, definition, axis in (("Axial3D", ViewLayoutDefinition.slice_view("Axial", label="Axial3D"), 2),
                                        ("Coronal3D", ViewLayoutDefinition.slice_view("Coronal", label="Coronal3D"),
                                         1)):
            context = make_slice_view(app, definition, volume, (512, 512))
            point = (low + high) / 2.0
            point[axis] = low[axis] - 4.0  # just below / behind the hippocampi
            context.get_view_node().JumpSliceByOffsetting(*point)
            context.set_visible_in_3d(True)
            context.render()
        view3d = app.view_manager.create_view(ViewLayoutDefinition.threed_view())
        view3d.update_size(*VIEW3D_PX)
        view3d.render_window().SetSize(*VIEW3D_PX)
        view3d.fit_view_to_content()
        focal = (low + high) / 2.0
        camera = view3d.get_camera_node()
        camera.SetFocalPoint(*focal)
        camera.SetPosition(*(focal + np.array(CAMERA_OFFSET_MM)))
        camera.SetViewUp(0.0, 0.0, 1.0)
        view3d.renderer().ResetCameraClippingRange()
        threed = grab(view3d)
    except Exception as exc:  # the slice screenshots are still written
        import traceback

        traceback.print_exc()
        print("3D view failed: %s" % exc, flush=True)

    info = {
        "centre": centre,
        "classes": classes,
        "samples": args.samples,
        "model": left.modelName,
        "uncertainty": _overlay_range(left.uncertaintyNode),
        "attention": _overlay_range(left.attentionNode) if left.attentionNode is not None else None,
    }
    written = compose(args.out, panels, threed, info)
    for path in written:
        print("wrote %s (%d KB)" % (path, os.path.getsize(path) // 1024), flush=True)
    print("done in %.0f s" % (time.perf_counter() - t0), flush=True)


def _overlay_range(node):
    display = node.GetDisplayNode()
    return display.GetWindowLevelMin(), display.GetWindowLevelMax(), display.GetLowerThreshold()


# ---- composition (matplotlib) -------------------------------------------------------------------------------------
ORIENTATION = {"Coronal": ("R", "L", "S", "I"), "Axial": ("R", "L", "A", "P")}  # left, right, top, bottom of screen


def _slice_axes(fig, images, info, top=0.90, bottom=0.17):
    import matplotlib.patheffects as pe

    axes = []
    names = list(images)
    width = 0.485
    for n, name in enumerate(names):
        ax = fig.add_axes([0.01 + n * (width + 0.01), bottom, width, top - bottom])
        ax.imshow(images[name], interpolation="none")
        ax.set_xticks([])
        ax.set_yticks([])
        r, a, s = info["centre"]
        where = "A %.0f mm" % a if name == "Coronal" else "S %.0f mm" % s
        ax.set_title("%s  (%s)" % (name, where), fontsize=13)
        left, right, up, down = ORIENTATION[name]
        style = dict(color="white", fontsize=13, fontweight="bold",
                     path_effects=[pe.withStroke(linewidth=2.5, foreground="black")])
        ax.text(0.015, 0.5, left, transform=ax.transAxes, ha="left", va="center", **style)
        ax.text(0.985, 0.5, right, transform=ax.transAxes, ha="right", va="center", **style)
        ax.text(0.5, 0.985, up, transform=ax.transAxes, ha="center", va="top", **style)
        ax.text(0.5, 0.015, down, transform=ax.transAxes, ha="center", va="bottom", **style)
        axes.append(ax)
    return axes


def _footer(fig, info, y=0.015, what="left hippocampus"):
    fig.text(0.5, y, "ICBM152 2009a T1 template (from nilearn), " + what + ", model '%s', %d samples.\n"
             "Rendered by 3D Slicer's MRML slice/3D views (slicer-core + trame-slicer, offscreen)."
             % (info["model"], info["samples"]), ha="center", va="bottom", fontsize=9, color="#444444")


def _segment_legend(fig, info, y, loc="center"):
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=color, edgecolor="black", label=name) for _, name, color in info["classes"]]
    fig.legend(handles=handles, loc=loc, bbox_to_anchor=(0.5, y), ncol=len(handles), frameon=False, fontsize=12)


def _colorbar(fig, low, high, threshold, label, y):
    import matplotlib as mpl

    cax = fig.add_axes([0.3, y, 0.4, 0.025])
    norm = mpl.colors.Normalize(vmin=low, vmax=high)
    bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap="inferno"), cax=cax, orientation="horizontal")
    bar.set_label(label, fontsize=11)
    bar.ax.tick_params(labelsize=9)
    cax.axvspan(low, threshold, color="white", alpha=0.75)
    return cax


def compose(out, panels, threed, info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    written = []
    dpi = 100
    size = (13.0, 7.9)

    def save(fig, name):
        path = os.path.join(out, name)
        fig.savefig(path, dpi=dpi, facecolor="white")
        plt.close(fig)
        _shrink_png(path)
        written.append(path)

    fig = plt.figure(figsize=size)
    _slice_axes(fig, panels["segmentation"], info)
    fig.suptitle("CDAL segmentation in 3D Slicer: segments over the T1 (fill + outline)", fontsize=15, y=0.985)
    _segment_legend(fig, info, 0.115)
    _footer(fig, info)
    save(fig, "segmentation.png")

    for key, title, label in (
            ("uncertainty", "Uncertainty overlay (ensemble variance, Inferno, low values transparent)",
             "per-voxel variance across %d samples (shaded part: transparent)" % info["samples"]),
            ("attention", "Attention overlay (Inferno, low values transparent)",
             "attention (shaded part: transparent)")):
        if key not in panels:
            continue
        low, high, threshold = info[key]
        fig = plt.figure(figsize=size)
        _slice_axes(fig, panels[key], info)
        fig.suptitle(title + "; segment outlines", fontsize=15, y=0.985)
        _colorbar(fig, low, high, threshold, label, 0.128)
        _footer(fig, info)
        save(fig, "%s.png" % key)

    if threed is not None:
        h, w = threed.shape[:2]
        height = h / 100.0 + 1.6  # inches: image + 1 in below (legend, footer) + 0.6 in above (title)
        fig = plt.figure(figsize=(w / 100.0, height))
        ax = fig.add_axes([0, 1.0 / height, 1, (h / 100.0) / height])
        ax.imshow(threed, interpolation="none")
        ax.axis("off")
        _segment_legend(fig, info, 0.68 / height)
        fig.text(0.5, 0.985, "3D view: closed surfaces of both hippocampi (two ROIs) in front of a coronal T1 slice, above an axial one",
                 ha="center", va="top", fontsize=14)
        _footer(fig, info, what="one ROI per hippocampus")
        save(fig, "3d.png")
    return written


def _shrink_png(path, limit=1000 * 1000):
    """Keep the PNG under ~1 MB (quantise to 256 colours if needed)."""
    if os.path.getsize(path) <= limit:
        return
    try:
        from PIL import Image
    except ImportError:
        return
    Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


if __name__ == "__main__":
    main()
