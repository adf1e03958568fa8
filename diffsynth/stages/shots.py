"""Shot detection (`data.shots: auto`): where the input video cuts to a new shot, so that no sliding window and no
FastBlend window blends two shots.

One unit, `shots.json`, for the whole video: PySceneDetect's ContentDetector fed the cropped input frames one at a
time (the frames the render smooths and denoises, so a letterbox or a crop never hides or invents a cut), each
downscaled as PySceneDetect's own SceneManager downscales a video's frames. Only the first frame of each shot is
stored. The detector's settings and the library's version are the stage's parameters: a changed threshold
recomputes this one unit, and the stages after it only where the detected shots changed (they hold the shot starts
themselves, not this stage's fingerprint).
"""

import json

import cv2

from .base import Stage

SHOTS_KEY = "shots.json"
MIN_SCENE_LEN = 15  # frames: ContentDetector's default (a cut closer than this to the previous one is merged)
TIMECODE_FPS = 24.0  # the detector's timecodes need a rate; with min_scene_len in frames it decides nothing


class ShotDetector:
    """PySceneDetect's ContentDetector over frames given one by one: `add(frame)` each uint8 RGB (H, W, 3) frame in
    order, then `shot_starts()`."""

    def __init__(self, threshold):
        from scenedetect import FrameTimecode
        from scenedetect.detectors import ContentDetector
        self.timecode = FrameTimecode
        self.detector = ContentDetector(threshold=threshold, min_scene_len=MIN_SCENE_LEN)
        self.cuts, self.count = [], 0

    def add(self, frame):
        from scenedetect.scene_manager import Interpolation, compute_downscale_factor
        height, width = frame.shape[:2]
        factor = compute_downscale_factor(max(width, height))  # SceneManager's auto downscale, with its interpolation
        if factor > 1.0:
            frame = cv2.resize(frame, (max(1, round(width / factor)), max(1, round(height / factor))),
                               interpolation=Interpolation.LINEAR.value)
        position = self.timecode(self.count, TIMECODE_FPS)
        cuts = self.detector.process_frame(position, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.cuts += [cut.frame_num for cut in cuts]
        self.count += 1

    def shot_starts(self):
        """[0, first frame of the second shot, …]."""
        if self.count:
            self.cuts += [cut.frame_num for cut in self.detector.post_process(self.timecode(self.count - 1,
                                                                                            TIMECODE_FPS))]
        return [0] + sorted({cut for cut in self.cuts if 0 < cut < self.count})


def detect_shot_starts(frames, threshold):
    """The first frame of each shot of `frames` (an iterable of uint8 RGB arrays, one in memory at a time)."""
    detector = ShotDetector(threshold)
    for frame in frames:
        detector.add(frame)
    return detector.shot_starts()


def detector_params(threshold):
    import scenedetect
    return {"detector": "ContentDetector", "threshold": threshold, "min_scene_len": MIN_SCENE_LEN,
            "scenedetect": scenedetect.__version__}


def shots_to_bytes(shot_starts, num_frames):
    return json.dumps({"shot_starts": list(shot_starts), "frames": num_frames}).encode()


def bytes_to_shots(data):
    return list(json.loads(data)["shot_starts"])


class ShotsStage(Stage):
    """One unit: the first frame of each shot of `frames` (a per-frame stage of uint8 RGB frames)."""
    name = "shots"
    version = "1"
    on_coordinator = True  # one unit reading every frame in order: nothing to spread
    prefetch_inputs = False  # it reads every frame; prefetching a unit's reads would hold the whole video

    def __init__(self, ctx, frames, threshold, name="shots"):
        super().__init__(ctx, [frames])
        self.name, self.frames, self.threshold = name, frames, threshold

    def params(self):
        return detector_params(self.threshold)

    def unit_keys(self):
        return [SHOTS_KEY]

    def reads(self, key):
        return [(self.frames, frame) for frame in self.frames.frame_keys()]

    def compute(self, key):
        keys = self.frames.frame_keys()
        starts = detect_shot_starts((self.read_image(self.frames, frame) for frame in keys), self.threshold)
        return shots_to_bytes(starts, len(keys)), None

    def detect_in_memory(self):
        """The same detection without a run folder (`diffsynth plan`): the frames computed by their own stage's
        code, one at a time, nothing written."""
        from ..cache import bytes_to_image
        keys = self.frames.frame_keys()
        frames = (bytes_to_image(data) for _, data, _ in self.frames.run(keys))
        return detect_shot_starts(frames, self.threshold)
