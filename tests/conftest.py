"""Shared test settings and fixtures: one CPU thread per test process; tiny random timm ViTs of two shapes; the app
opened in streamlit's AppTest (`open_app`).

The thread settings come before torch is imported, since OpenMP reads them when it starts. The tests' models are
tiny, so one thread costs little on a quiet machine; on a busy one (other CPU-bound work beside the suite) the
threads of one process wait for each other at every parallel operation, and spinning threads take CPU from the
rest. Values already set in the environment win; subprocesses the tests start inherit them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

THREAD_SETTINGS = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # PASSIVE: idle threads sleep, never spin
for name, value in THREAD_SETTINGS.items():
    if not os.environ.get(name):
        os.environ[name] = value

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

if TYPE_CHECKING:
    from streamlit.testing.v1 import AppTest

TINY_SHAPES = {
    # A vit_tiny-like model: patch 8, class token, no LayerScale.
    "vit": dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    # A DINOv2-like model: patch 14, LayerScale (init raised from 1e-5 so the blocks matter in the checks).
    "dinov2": dict(
        name="vit_small_patch14_dinov2",
        img_size=28,
        patch_size=14,
        embed_dim=64,
        depth=2,
        num_heads=4,
        init_values=0.1,
    ),
}


def tiny_vit(shape: str, num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A small random timm ViT of one of the two supported shapes, in eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(TINY_SHAPES[shape])
    model = timm.create_model(kwargs.pop("name"), pretrained=False, num_classes=num_classes, **kwargs)
    return model.eval()


@pytest.fixture(params=list(TINY_SHAPES))
def shape(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs for the whole session (starting one takes seconds), shut down at the end."""
    import ray

    from core import jobs

    jobs.connect(num_cpus=2)
    yield
    jobs.forget_managers()
    ray.shutdown()


APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"


def open_app(
    page: str | None = None,
    *,
    user: dict[str, Any] | None = None,
    query: Mapping[str, str] | None = None,
    session: Mapping[str, Any] | None = None,
    timeout: float = 60,
) -> AppTest:
    """The app in streamlit's AppTest, run once through its router, then on ``page`` when given; fails the test
    on an exception in either run.

    Args:
        page: A page script relative to ``app/``, e.g. ``app_pages/train.py``; None stays on the default page.
        user: What ``st.user`` holds (a signed-in or signed-out visitor).
        query: The page address's query parameters, e.g. ``{"run": run_id}`` as after a reload.
        session: Session state set before the first run (what this browser session already holds).
        timeout: Seconds each script run may take.
    """
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=timeout)
    if user is not None:
        at.user = user
    for key, value in (query or {}).items():
        at.query_params[key] = value
    for key, value in (session or {}).items():
        at.session_state[key] = value
    at.run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at
