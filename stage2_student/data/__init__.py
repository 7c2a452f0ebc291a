"""Store + images -> student batches (DESIGN.md §2, §3, §4, §5.1, §6).

One module per job, bottom to top:

* ``pixel_cache``: :class:`PixelCache`, the on-disk cache of the student's preprocessed image
  tensors (``data.pixel_cache_dir``).
* ``reencode``: :class:`StudentEncoder`, each sample's student encoding built from the teacher's
  stored ids (only the image blocks re-expanded, [fast path note]); :class:`StudentDataError`.
* ``remap``: :func:`remap` moves one sample's teacher signals onto the student's encoding of it
  (:class:`StudentTargets`; [geometry note]).
* ``order``: :func:`epoch_order` / :func:`epoch_samples`: the data order, a pure function of
  (seed, epoch, shard sizes, block size, window), so resume state is (epoch, batch index)
  ([order note]).
* ``batch``: :func:`collate` turns the targets of B samples into a :class:`StudentBatch` of flat
  target rows ready for ``stage2_student.losses``; :func:`packed` for DataLoader workers.
* ``dataset``: :class:`StoreDataset` reads blocks of samples from the store and yields this
  rank's batches in that order.
"""

from stage2_student.data.batch import IvaRows, KdRows, SaliencyRows, StudentBatch, TpaRows, collate, packed
from stage2_student.data.dataset import StoreDataset
from stage2_student.data.order import batches_per_epoch, epoch_order, epoch_samples
from stage2_student.data.reencode import StudentDataError
from stage2_student.data.remap import StudentTargets, remap

__all__ = [
    "IvaRows",
    "KdRows",
    "SaliencyRows",
    "StoreDataset",
    "StudentBatch",
    "StudentDataError",
    "StudentTargets",
    "TpaRows",
    "batches_per_epoch",
    "collate",
    "epoch_order",
    "epoch_samples",
    "packed",
    "remap",
]
