"""What every stage is: named work units whose results go through the run's disk cache.

A stage declares its inputs (other stages), its parameters and a code version; together they make its fingerprint,
so a change anywhere upstream makes it stale. It lists its unit keys and computes units from cached inputs.
"""

from functools import cached_property

from ..cache import as_rgb, bytes_to_image, bytes_to_tensors, fingerprint


class Stage:
    name = "stage"
    version = "1"          # bump when the stage's code changes what it writes
    ephemeral = False      # files deleted once every stage reading them is complete (denoising intermediates)
    prefetch_inputs = True  # the runner's reader thread loads the next units' declared reads while this one computes
    keep = "all"           # the run's data.keep policy (set by build_stages): which stages' files go once read
    kept_for_resume = False  # kept under keep=resume although its readers are done (the final latents: small, costly)
    on_coordinator = False  # its units run in the render process even with many workers (reads a local file, or serial)
    runs_in_order = False  # its units reuse what the one before computed in the same process (ControlNet residuals):
    #                        with many workers, a worker runs its block's units in their order, not as they get ready
    model_free = False     # its units use no model, only arithmetic on their inputs (a frame's DDIM step): a Ray
    #                        worker may run them beside a unit that does, instead of queued behind it

    def __init__(self, ctx, inputs=()):
        self.ctx = ctx
        self.inputs = tuple(inputs)
        self.counts = {}  # work counted while computing (e.g. ControlNet frame evaluations), for the run's record

    def params(self):
        """Everything besides the inputs that decides this stage's results."""
        return {}

    def unit_keys(self):
        raise NotImplementedError

    def frame_keys(self):
        """The per-frame results the next stage reads, in frame order (most stages: all their units)."""
        return self.unit_keys()

    def reads(self, key):
        """The input units unit `key` reads, as (input stage, key) pairs. The runner recomputes exactly these when
        they were released and the unit still has to be computed; prefetching and planning rest on it too. The
        default fits per-frame stages: the same key in every input. Stages that read otherwise override it."""
        return [(stage, key) for stage in self.inputs]

    def internal_keys(self):
        """Units that only this stage's own later units read (FastBlend's tables): with many workers they are
        released as soon as every unit reading them is done (the stage's own `run` does it in order otherwise)."""
        return []

    def input_warnings(self):
        """Lines about the inputs that the render takes as the lines say (not errors): printed and logged before any
        work starts, and shown by `diffsynth plan`."""
        return []

    def compute(self, key):
        """The bytes of one unit (and, optionally, its path relative to the run folder) as (data, path)."""
        raise NotImplementedError

    def run(self, pending_keys):
        """Yield (key, data, path) for each pending key. Stages that stream (video decode, video encode) override."""
        for key in pending_keys:
            data, path = self.compute(key)
            yield key, data, path

    @cached_property
    def fingerprint(self):
        return fingerprint(self.name, self.version, self.params(), [stage.fingerprint for stage in self.inputs])

    # --- reading inputs, one way each ------------------------------------------------------------------------------
    def read_bytes(self, stage, key):
        return self.ctx.cache.read(stage.name, key)

    def read_image(self, stage, key):
        """A cached frame as uint8 (H, W, 3): one-channel maps (edges, depth) are stored as one channel and
        expanded here."""
        return as_rgb(bytes_to_image(self.read_bytes(stage, key)))

    def read_tensors(self, stage, key):
        return bytes_to_tensors(self.read_bytes(stage, key))


def frame_key(index):
    """The key of frame `index`'s unit, the same in every per-frame stage."""
    return f"{index:06d}.safetensors"


def frame_index(key):
    return int(key.split(".")[0])
