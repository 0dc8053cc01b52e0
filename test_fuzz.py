"""Coverage-guided fuzzing in CI: each parser ISS owns, and its image boundary, for a few seconds.

scripts/fuzz.py runs Atheris (libFuzzer) on one target; here each runs for a fixed
small budget (about 25 s in all, with the start of each) and must end without a finding. Every input that
once was a finding is kept in fuzz_corpus/<target>/ and replayed here on every run.
A long run is by hand: ``python scripts/fuzz.py image -max_total_time=3600``.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys

import pytest

from iss_server import images
from iss_testing import HERE

FUZZ = HERE / 'scripts' / 'fuzz.py'
#: A small parent between pytest and the fuzzer, so libFuzzer's peak RSS is the fuzzer's own.
#: NOTE: Linux carries a process's peak RSS across exec (getrusage's ru_maxrss, which libFuzzer's
#: -rss_limit_mb reads): started straight from a pytest process that once held 2.3 GB (the whole
#: suite, in CI), the fuzzer stopped at its first input with "out-of-memory" at 2298 MB.
#: A child forked from a fresh small process starts from that process's peak instead.
FRESH_PEAK = [sys.executable, '-c', 'import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))']
#: Seconds of fuzzing per target in CI: the image boundary gets the most, as it has the most code.
BUDGET = {'tus': 2, 'range': 2, 'form': 3, 'meta': 2, 'image': 8}


def load_fuzz():
    spec = importlib.util.spec_from_file_location('fuzz', FUZZ)
    module = importlib.util.module_from_spec(spec)
    sys.modules['fuzz'] = module
    spec.loader.exec_module(module)
    return module


fuzz = load_fuzz()


def test_every_target_is_fuzzed_here():
    assert set(BUDGET) == set(fuzz.TARGETS) == set(fuzz.INSTRUMENTED)


@pytest.mark.parametrize('target', list(BUDGET))
def test_a_short_fuzzing_run_finds_nothing(target, tmp_path):
    pytest.importorskip('atheris', reason='requirements-dev.txt installs atheris')
    run = subprocess.run(
        [*FRESH_PEAK, sys.executable, str(FUZZ), target, f'-max_total_time={BUDGET[target]}', '-timeout=30']
        + ['-seed=29'],
        cwd=tmp_path,  # NOTE: where libFuzzer writes a crash-<sha1> it finds
        capture_output=True,
        text=True,
        timeout=BUDGET[target] + 120,
    )
    findings = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(('crash-', 'timeout-')))
    assert run.returncode == 0 and not findings, (findings, run.stderr[-4000:])
    assert 'Done ' in run.stderr, run.stderr[-2000:]


@pytest.mark.parametrize(
    'path',
    sorted(path for path in (HERE / 'fuzz_corpus').glob('*/*') if path.is_file()),
    ids=lambda path: f'{path.parent.name}/{path.name}',
)
def test_every_finding_kept_replays_without_one(path):
    fuzz.TARGETS[path.parent.name](path.read_bytes())


def test_the_image_seeds_are_a_file_of_every_format_pillow_writes_here(tmp_path):
    fuzz.image_seeds(tmp_path)
    formats = {images.identify(io.BytesIO(path.read_bytes())).format for path in tmp_path.iterdir()}
    expected = {'PNG', 'JPEG', 'GIF', 'TIFF', 'WEBP', 'BMP', 'JXL', 'HEIF'}
    expected |= {'AVIF'} if 'avif' in images.OUTPUT_FORMATS else set()
    assert formats == expected
    for path in tmp_path.iterdir():
        fuzz.image(path.read_bytes())
