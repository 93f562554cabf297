"""Getting the images in: download, the patient-grouped split, the leakage audit, decoding and preprocessing."""
