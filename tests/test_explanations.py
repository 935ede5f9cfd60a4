"""explanations.py: which test images are explained."""
import explanations


def test_explained_images_are_a_shuffled_prefix_of_one_fixed_order():
    everything = explanations.explanation_indices(100, "all")
    assert sorted(everything) == list(range(100)) and everything != list(range(100))
    assert explanations.explanation_indices(100, "10") == everything[:10]  # more images extend the set
    assert sorted(explanations.explanation_indices(5, "10")) == [0, 1, 2, 3, 4]
