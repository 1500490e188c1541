"""Local intrinsic dimension of parameter groups (random-subspace training), d90 submodule selection, and a proxy.

Li et al. (2018) train one group of a frozen model's weights in a random d-dimensional subspace,
``theta = theta_0 + P theta_d``, and call *d90* the smallest d that reaches 90% of the accuracy of training the
whole group; a group with a low d90 adapts with few degrees of freedom. Read in this order:

    projections   P: dense Gaussian (small D * d) and Fastfood (large D * d), on the fast Walsh-Hadamard transform.
    groups        which (block, matrix) pairs a group holds, as a ``Targets`` string, and its weight slots.
    config        the settings of a measurement.
    subspace      one trial: train ``theta_d`` (or the whole group) and a fresh head, then score it.
    block_cache   running a ViT from the cached tokens entering a group's first block.
    search        the d90 search over d within a trial budget.
    measure       the measurement over groups, its result, and the recommended ``targets`` string.
    proxy         a cheap proxy of a different quantity: the intrinsic dimension of each block's output
                  representation (TwoNN, MLE).
"""

from core.intrinsic_dim.config import IntrinsicDimConfig
from core.intrinsic_dim.groups import (
    GROUP_SCHEMES,
    Reparam,
    Slot,
    classifier_path,
    group_slots,
    resolve_groups,
    scheme_groups,
    slot_sizes,
    union_targets,
)
from core.intrinsic_dim.measure import (
    GroupResult,
    IntrinsicDimResult,
    OnTrial,
    Trial,
    measure_intrinsic_dimension,
    recommend_targets,
)
from core.intrinsic_dim.projections import (
    ConcatProjection,
    DenseProjection,
    FastfoodProjection,
    IdentityProjection,
    Projection,
    fastfood_chunks,
    fwht,
    make_projection,
)
from core.intrinsic_dim.proxy import REPRESENTATION_ID_LABEL, mle_dimension, representation_dimension, twonn_dimension
from core.intrinsic_dim.search import D90Search, d_grid, pass_rates, search_d90
from core.intrinsic_dim.subspace import Cancelled, TrialOutcome, accuracy_score, fresh_head, subspace_trial

__all__ = [
    "GROUP_SCHEMES",
    "REPRESENTATION_ID_LABEL",
    "Cancelled",
    "ConcatProjection",
    "D90Search",
    "DenseProjection",
    "FastfoodProjection",
    "GroupResult",
    "IdentityProjection",
    "IntrinsicDimConfig",
    "IntrinsicDimResult",
    "OnTrial",
    "Projection",
    "Reparam",
    "Slot",
    "Trial",
    "TrialOutcome",
    "accuracy_score",
    "classifier_path",
    "d_grid",
    "fastfood_chunks",
    "fresh_head",
    "fwht",
    "group_slots",
    "make_projection",
    "measure_intrinsic_dimension",
    "mle_dimension",
    "pass_rates",
    "recommend_targets",
    "representation_dimension",
    "resolve_groups",
    "scheme_groups",
    "search_d90",
    "slot_sizes",
    "subspace_trial",
    "twonn_dimension",
    "union_targets",
]
