from util.misc import modality_pairs, pair_name


def test_pairs_are_all_unordered_pairs_sorted_by_name():
    assert modality_pairs(["vision", "tactile", "text"]) == [
        ("tactile", "text"), ("tactile", "vision"), ("text", "vision")]
    assert modality_pairs(["vision", "tactile"]) == [("tactile", "vision")]
    assert pair_name("vision", "tactile") == pair_name("tactile", "vision") == "tactile_vision"
