"""centre_shift.py: how far the test split lies from the training data, measured rather than assumed.

    metrics["centre_shift"] = centre_shift.centre_shift(ds, val_probs, test_probs, colour_reference)

PathMNIST's test split (CRC-VAL-HE-7K) comes from another clinical centre than its training and
validation splits (NCT-CRC-HE-100K), and NCT-CRC-HE-100K was split into train and validation at the
patch level, so validation shares slides with training and flatters the model. What the gap between
validation and test is made of is measured here, on any dataset with colour statistics: per-class
recall on validation against test; the share of test images the input check (tiles.py's) flags as
unlike the training split, with accuracy on flagged and unflagged images; and how far colour alone
goes, a logistic regression on each image's per-channel mean and s.d., fitted on train and scored on
validation and test. Which datasets' test splits come from another centre is OTHER_CENTRE's, with
its source.
"""
import colour
from datasets import MULTI_LABEL

# Datasets whose test split comes from another centre than their training split, and the source.
OTHER_CENTRE = {
    "pathmnist": ("CRC-VAL-HE-7K (test) comes from another clinical centre than NCT-CRC-HE-100K (training and "
                  "validation), and NCT-CRC-HE-100K was split at the patch level, so validation shares slides "
                  "with training", "Kather et al., PLOS Medicine 2019; MedMNIST v2, Yang et al. 2023"),
}
COLOUR_BASELINE_ITERATIONS = 1000


def centre_shift(ds, val_probs, test_probs, reference):
    """The shift measures for single-label data (None for multi-label data, where recall per class
    and a colour-only classifier do not carry over): per-class recall on validation and test, the
    flagged share with accuracies, and the colour-only baseline's ACC on validation and test."""
    if ds.task == MULTI_LABEL:
        return None
    names = ds.class_names
    val_y, test_y = ds.val.labels.numpy(), ds.test.labels.numpy()
    origin = (None, None) if ds.synthetic else OTHER_CENTRE.get(ds.flag, (None, None))  # a stand-in has no centre
    out = {"other_centre": origin[0], "source": origin[1],
           "recall": [{"class": n, "val": recall(val_y, val_probs, c), "test": recall(test_y, test_probs, c)}
                      for c, n in enumerate(names)]}
    if reference:
        flagged = (colour.colour_distance(reference, ds.test.images) > reference["threshold"]).numpy()
        right = test_probs.argmax(1) == test_y
        out["flagged"] = {"share": float(flagged.mean()), "n": int(flagged.sum()),
                          "acc_flagged": float(right[flagged].mean()) if flagged.any() else None,
                          "acc_unflagged": float(right[~flagged].mean()) if (~flagged).any() else None}
    out["colour_only"] = colour_only_baseline(ds)
    return out


def recall(labels, probs, c):
    picked = labels == c
    return float((probs[picked].argmax(1) == c).mean()) if picked.any() else None


def colour_only_baseline(ds):
    """ACC on validation and test of a logistic regression on each image's per-channel mean and
    s.d. (colour.colour_features), fitted on the training split: how far colour alone goes."""
    from sklearn.linear_model import LogisticRegression  # a medmnist dependency; loaded only here
    from sklearn.preprocessing import StandardScaler

    def features(split):
        return colour.colour_features(split.images).numpy()
    scale = StandardScaler().fit(features(ds.train))
    fit = LogisticRegression(max_iter=COLOUR_BASELINE_ITERATIONS).fit(scale.transform(features(ds.train)),
                                                                     ds.train.labels.numpy())
    return {split: float(fit.score(scale.transform(features(getattr(ds, split))), getattr(ds, split).labels.numpy()))
            for split in ("val", "test")}

