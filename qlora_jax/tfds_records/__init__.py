"""A TFDS builder that prepares local JSON / JSON Lines records into array_record files.

It needs ``tensorflow-datasets`` (the ``tfds`` extra) but not TensorFlow: preparing
writes array_record shards, and reading goes through ``tfds.data_source``. Each
example keeps the record as JSON text plus where it came from (``file:line``), so
every data format of ``qlora_jax.data`` works unchanged. Reading uses the builder's
``as_data_source`` (what ``tfds.data_source`` calls), since this builder takes its
records as an argument and cannot be rebuilt from the registry by name. TFDS insists that a
builder live in a package of its own, hence this one-module package.
"""

import hashlib
import json
from pathlib import Path

import tensorflow_datasets as tfds


class JsonRecords(tfds.core.GeneratorBasedBuilder):
    """One ``train`` split of ``{"record": JSON text, "where": "file:line"}`` examples."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, records: list[tuple[str, object]], **kwargs):
        self._records = records
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"record": tfds.features.Text(), "where": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index, (where, record) in enumerate(self._records):
            yield index, {"record": json.dumps(record, ensure_ascii=False), "where": where}


def prepared_records(source: Path, records: list[tuple[str, object]], cache: Path) -> list[tuple[str, object]]:
    """Prepare ``records`` of ``source`` as a TFDS dataset under ``cache`` (once per file content), read it back."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    data_dir = cache / f"{source.stem}-{digest}"
    builder = JsonRecords(records=records, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()  # reads only the local records: nothing is downloaded
    source_ds = builder.as_data_source(split="train")  # what tfds.data_source returns, from this builder
    examples = [source_ds[i] for i in range(len(source_ds))]
    decoded = [(e["where"].decode() if isinstance(e["where"], bytes) else e["where"],
                json.loads(e["record"])) for e in examples]
    order = {where: i for i, (where, _) in enumerate(records)}
    return sorted(decoded, key=lambda item: order[item[0]])  # TFDS shuffles on write; keep the file's order
