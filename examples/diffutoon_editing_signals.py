"""Diffutoon toon shading with editing signals, in two resumable renders: `python examples/diffutoon_editing_signals.py`.

Stage 1 renders a colour video (configs/diffutoon_editing_signals_color.yaml: no motion module, cross-frame
attention, softedge + depth); stage 2 (configs/diffutoon_editing_signals_toon.yaml) renders the toon video with that
colour video as the tile ControlNet's frames. Each stage is its own run folder: run the script again after a crash
and each stage continues where it stopped (a finished stage 1 is reused, not recomputed). Paths in the configs are
relative to the configs folder; docs/models.md lists the model files. The original script of this recipe also runs
unchanged (docs/coming_from_diffutoon.md).
"""

from pathlib import Path

from diffsynth.config import load_config
from diffsynth.render import render

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

if __name__ == "__main__":
    color = load_config(CONFIGS / "diffutoon_editing_signals_color.yaml")
    toon = load_config(CONFIGS / "diffutoon_editing_signals_toon.yaml")
    # The toon stage's tile frames are the colour stage's video: check the two configs agree before rendering.
    color_video = Path(color.data.output_folder) / "video.mp4"
    if toon.data.controlnet_frames[0].video_file != str(color_video):
        raise SystemExit(f"the toon config's first controlnet_frames entry should be {color_video}")
    print(render(color))
    print(render(toon))
