"""Reading the structure off a run: masks of supp(Γ), entry order, solution paths, reports."""

from .masks import (
                    EntryTracker,
                    Mask,
                    PathRecorder,
                    applied_masks,
                    format_report,
                    layer_report,
                    mask_at,
                    named_masks,
                    named_penalties,
                    unwrap,
)

__all__ = ["EntryTracker", "Mask", "PathRecorder", "applied_masks", "format_report",
           "layer_report", "mask_at", "named_masks", "named_penalties", "unwrap"]
