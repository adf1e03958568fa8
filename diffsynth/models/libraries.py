"""How this project uses diffusers and transformers: offline, quiet. Imported by every module that loads or makes
models (loader, tiny, check), so it imports none of them."""

import os


def quiet_libraries():
    """Offline by construction, and no per-file progress bars interleaved with ours."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
