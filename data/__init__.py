"""The data: readers, schema serialisation, prompt formats, TFDS builders, grain pipelines, synthetic benchmark."""
