"""Run folders, manifests, fingerprints, atomic writes and sharding."""

from ssr_cli.artefacts.atomic import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text
from ssr_cli.artefacts.fingerprint import fingerprint
from ssr_cli.artefacts.run import MANIFEST, RunFolder, read_manifest
from ssr_cli.artefacts.shard import Shard, parse_shard

__all__ = [
    "MANIFEST",
    "RunFolder",
    "Shard",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fingerprint",
    "parse_shard",
    "read_manifest",
]
