"""The words BoneBreak must always say, written once: the app, the model card and the reports use these.

The README and an exported Space's page carry the same research-demo notice; tests check it there.
"""

DATASET_URL = "https://universe.roboflow.com/curso-rphcb/bone-break-classification"

RESEARCH_DEMO = (
    "**Research demo, not a diagnostic device.** The model was trained on about a thousand images of one small public "
    "dataset and is often wrong. It only names a fracture *type*; it cannot tell whether a bone is broken at all. "
    "Never use it for medical decisions: ask a qualified clinician."
)

DATASET_ATTRIBUTION = (
    "Trained on the Roboflow Universe dataset \"bone-break-classification\" (workspace curso-rphcb, export "
    f"2023-12-07), licensed CC BY 4.0: {DATASET_URL}."
)

LEAKAGE = (
    "The published Train/Test split of this dataset leaks near-duplicates (re-encoded, flipped and "
    "annotated copies of Train images appear in Test), so a score on it overstates accuracy on new X-rays."
)

CLEAN_TEST = (
    "clean_test holds the published Test images that have no near-duplicate in Train (see `bonebreak audit`); "
    "it is small, so read the confidence intervals."
)

UNAUDITED = (
    "No near-duplicate audit describes this data folder, so it is unknown whether its test split shares "
    "pictures with train: run `bonebreak audit --data_dir ...` to find out."
)
