"""Names shared by every module: the modalities and the pairs the loss compares."""
import itertools

MODALITIES = ("vision", "tactile", "text")  # TVL's names


def in_canonical_order(names):
    """Distinct modality names in MODALITIES order, whatever order the flags gave them in."""
    return sorted(set(names), key=MODALITIES.index)


def modality_pairs(active):
    """All unordered pairs of active modalities, each sorted by name: [("tactile", "vision"), ...]."""
    return [tuple(sorted(p)) for p in itertools.combinations(sorted(active), 2)]


def pair_name(a, b):
    """Key used in logs and metrics for a pair, names sorted: pair_name("vision", "tactile") == "tactile_vision"."""
    return "_".join(sorted((a, b)))
