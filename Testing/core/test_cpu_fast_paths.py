"""The CPU fast paths of inference (issue 17) must not change results: each is pinned to the plain path."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cdal_core import networks
from cdal_core.inference import _segment_array as _real_segment_array
from cdal_core.inference import segment_image
from cdal_core.model_io import load_model

from core_settings import SHARED_DATA

HIPPO = SHARED_DATA / "Task04_Hippocampus" / "imagesTr"


@pytest.mark.skipif(not HIPPO.is_dir(), reason="../shared/data is absent")
def test_fp32_fused_group_norm_keeps_the_shipped_models_outputs(monkeypatch):
    """float32 channels-last AdaGN runs as moments + one affine instead of torch's GroupNorm and a broadcast
    multiply-add. On a real volume with the shipped 3-generator ensemble, fixed seed, T=2 x 5 samples: the same
    probabilities (to float32 rounding carried through two steps), labels, uncertainty and early exits."""
    model = load_model("hippocampus")
    image = sitk.ReadImage(str(sorted(HIPPO.glob("hippo*.nii.gz"))[0]))
    fast = segment_image(image, model, samples=5, seed=0, precision="fp32")
    monkeypatch.setattr(networks, "_fused_norm_on_cpu", lambda x: False)
    plain = segment_image(image, model, samples=5, seed=0, precision="fp32")
    assert np.abs(fast.probabilities - plain.probabilities).max() < 1e-4  # measured 2e-6
    agree = np.mean(sitk.GetArrayFromImage(fast.labels) == sitk.GetArrayFromImage(plain.labels))
    assert agree > 0.9995, agree
    u_fast, u_plain = (sitk.GetArrayFromImage(r.uncertainty) for r in (fast, plain))
    assert np.abs(u_fast - u_plain).max() < 1e-4
    assert abs(float(u_fast.mean()) - float(u_plain.mean())) < 1e-5
    a_fast, a_plain = (sitk.GetArrayFromImage(r.attention) for r in (fast, plain))
    assert np.abs(a_fast - a_plain).max() < 1e-2


@pytest.mark.skipif(not HIPPO.is_dir(), reason="../shared/data is absent")
def test_channels_last_discriminator_keeps_the_attention():
    """The shipped model's discriminator loads channels-last, like its generators (its average pooling and
    convolutions were 2-5x slower per call in the contiguous layout), and sampling runs it only up to the
    attention block. The attention of a real volume is that of the contiguous, whole discriminator."""
    model = load_model("hippocampus")
    assert networks.is_channels_last(model.discriminator.stem.weight)
    image = sitk.ReadImage(str(sorted(HIPPO.glob("hippo*.nii.gz"))[1]))
    fast = segment_image(image, model, samples=5, seed=0, precision="fp32")
    model.discriminator.to(memory_format=torch.contiguous_format)
    plain = segment_image(image, model, samples=5, seed=0, precision="fp32")
    a_fast, a_plain = (sitk.GetArrayFromImage(r.attention) for r in (fast, plain))
    assert np.abs(a_fast - a_plain).max() < 1e-5  # measured 3.6e-7
    assert np.array_equal(sitk.GetArrayFromImage(fast.labels), sitk.GetArrayFromImage(plain.labels))


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    """Inference uses the cores other processes leave free (OpenMP threads that share a busy core stall the
    whole run); an explicit CDAL_THREADS wins."""
    from cdal_core import inference
    monkeypatch.delenv("CDAL_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(inference, "_running_elsewhere", lambda: 0)
    assert inference.cpu_threads(4) == 4
    monkeypatch.setattr(inference, "_running_elsewhere", lambda: 1)
    assert inference.cpu_threads(4) == 3 and inference.cpu_threads(2) == 1
    monkeypatch.setattr(inference, "_running_elsewhere", lambda: 9)
    assert inference.cpu_threads(2) == 1
    monkeypatch.setenv("CDAL_THREADS", "2")
    assert inference.cpu_threads(8) == 2


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="the probe reads Linux's /proc")
def test_the_probe_sees_another_busy_process():
    """The real probe, not a stand-in: a process spinning beside this one is counted."""
    from cdal_core import inference
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        seen = 0
        for _ in range(40):  # a busy machine may preempt it now and then: look a few times
            seen = max(seen, inference._running_elsewhere())
            time.sleep(0.01)
    finally:
        spinner.kill()
        spinner.wait()
    assert seen >= 1


def test_a_passing_thread_does_not_halve_the_run(monkeypatch):
    """A task runnable for a fraction of a millisecond (a kernel thread passing by) was seen by all three
    back-to-back looks and took a core from the run; looks a millisecond apart see it once at most."""
    import time
    from cdal_core import inference
    monkeypatch.delenv("CDAL_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for _ in range(3):
        blip_ends = time.perf_counter() + 0.0005
        monkeypatch.setattr(inference, "_running_elsewhere", lambda: int(time.perf_counter() < blip_ends))
        assert inference.cpu_threads(2) == 2


def test_a_run_adapts_threads_for_itself_and_gives_them_back(monkeypatch, tiny_model):
    """The thread count is process-wide: a training run validating through segment_image must find its own
    count again afterwards, or its later steps (and so an exact resume) depend on the machine's load."""
    from cdal_core import inference
    from cdal_core.synthetic import make_volume, to_image
    seen = []
    monkeypatch.delenv("CDAL_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(inference, "cpu_threads", lambda cores=None: 1)
    monkeypatch.setattr(inference, "_segment_array",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or _real_segment_array(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        img, _ = make_volume(np.random.default_rng(2))
        segment_image(to_image(img.astype(np.float32)), load_model(tiny_model), samples=1, steps=1, seed=0)
        assert seen == [1]                      # the run itself used what was free
        assert torch.get_num_threads() == 2     # and the caller's setting is back
    finally:
        torch.set_num_threads(before)

