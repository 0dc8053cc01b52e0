"""Coverage-guided fuzzing (Atheris, libFuzzer) of the parsers ISS owns and of its image boundary.

    python scripts/fuzz.py TARGET [libFuzzer options]
    python scripts/fuzz.py image -max_total_time=3600 -jobs=2    # a long run, by hand

Targets: ``tus`` (the tus header parsers of iss_server/resumable.py), ``range``
(the Range and If-Range of iss_server/responses.py), ``form`` (the multipart parser, iss_server/forms.py),
``meta`` (an artifact's meta, its kind, type and file name: iss_server/meta.py) and
``image`` (images.identify, check_decodes and render: every call ISS makes into Pillow, and
formats.jxl_header, whose reading of a JPEG XL must agree with what libjxl decodes).

Each target lets through only the refusals its code documents; any other exception,
or an answer that breaks the target's invariant, is a finding: libFuzzer stops and
writes the input as ``crash-<sha1>`` in the current directory. Keep it, under a name
that says what it did, in ``fuzz_corpus/TARGET/``: test_fuzz.py replays every file
there, and the fuzzer starts from them (with, for ``image``, a file of every format
Pillow writes here). libFuzzer's options go after the target (``-max_total_time=``,
``-runs=``, ``-seed=``, ``-jobs=``; ``-help=1`` lists them).
"""

from __future__ import annotations

import io
import json
import logging
import pathlib
import sys
import tempfile
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent.parent
CORPUS = HERE / 'fuzz_corpus'
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# NOTE: the modules fuzzed are imported by main() inside atheris.instrument_imports (for
# coverage); the targets import them when they run, so the replay needs no Atheris.


def tus(data: bytes) -> None:
    """Every tus header parser, on any header value (WSGI gives them as Latin-1 text)."""
    from iss_server import resumable
    from iss_server.errors import BadRequest

    value = data.decode('latin-1')
    for parse in (resumable.parse_length, resumable.parse_offset):
        try:
            count = parse(value)
        except BadRequest:
            continue
        assert value.isascii() and value.isdigit() and 0 <= count < 2**63, value
    try:
        metadata = resumable.parse_metadata(value)
    except BadRequest:
        pass
    else:
        assert resumable.parse_metadata(resumable.format_metadata(metadata)) == metadata
    try:
        resumable.parse_checksum(value)
    except BadRequest:
        pass


def range_(data: bytes) -> None:
    """The file responses' Range (with If-Range): a range inside the blob, None, or 416."""
    import falcon
    import falcon.testing

    from iss_server import responses

    size = int.from_bytes(data[:2], 'big')
    range_header, _, if_range = data[2:].decode('latin-1').partition('\n')
    headers = {'Range': range_header, **({'If-Range': if_range} if if_range else {})}
    req = falcon.Request(falcon.testing.create_environ(headers=headers))
    try:
        chosen = responses._requested_range(req, 'sha256:' + '0' * 64, size)
    except falcon.HTTPRangeNotSatisfiable:
        return
    if chosen is not None:
        start, end = chosen
        assert 0 <= start <= end < size, (range_header, size, chosen)


class _Body:
    def __init__(self, data: bytes, step: int) -> None:
        self._data = io.BytesIO(data)
        self._step = step  # NOTE: the body arrives in pieces of this size, as a socket hands it over

    def readinto(self, buffer: memoryview) -> int:
        return self._data.readinto(buffer[: self._step])


def form(data: bytes) -> None:
    """The multipart parser on any body (and boundary): parts, or Falcon's 400s."""
    import falcon

    from iss_server import forms

    boundary_length = 1 + data[0] % 16 if data else 1
    boundary = data[1 : 1 + boundary_length].decode('latin-1')
    body = data[1 + boundary_length :]
    step = 1 + (data[-1] if data else 0)
    try:
        reader = forms.FormReader(
            _Body(body, step), f'multipart/form-data; boundary="{boundary}"', max_parts=8, length=len(body)
        )
        total = 0
        for index, part in enumerate(reader.parts()):
            if index % 2:
                total += len(part.read_all(64))
            else:
                buffer = memoryview(bytearray(7))
                while count := part.readinto(buffer):
                    total += count
            assert isinstance(part.content_type, str)
        assert total <= len(body)
    except (falcon.MultipartParseError, falcon.HTTPInvalidHeader):
        pass


def meta(data: bytes) -> None:
    """An artifact's meta (JSON), kind, media type and file name, as a client sends them."""
    from iss_server import meta as meta_module
    from iss_server.errors import BadRequest

    text = data.decode('utf-8', 'replace')
    try:
        parsed = meta_module.parse_user_meta(text, 1024)
    except BadRequest:
        pass
    else:
        assert isinstance(parsed, dict) and not meta_module.RESERVED_KEYS.intersection(parsed)
        json.dumps(parsed, allow_nan=False, ensure_ascii=False).encode()
    try:
        meta_module.check_kind(text)
    except BadRequest:
        pass
    mime = meta_module.media_type(text)
    assert '\n' not in mime and '\r' not in mime, mime
    name = meta_module.clean_filename(text)
    assert name is None or ('/' not in name and len(name.encode()) <= 255), name


def image(data: bytes) -> None:
    """What ISS does with an upload's bytes and then with a derivative: typed refusals only."""
    from iss_server import images

    variant = images.Variant(24, 24, 'cover', 'PNG', None)
    max_pixels = 4096 * 4096  # NOTE: a fuzzer's image of 89 MP would take seconds per run
    try:
        info = images.identify(io.BytesIO(data), max_pixels)
    except (images.NotAnImage, images.ImageTooLarge):
        return
    json.dumps(info.fields, allow_nan=False)
    try:
        images.check_decodes(io.BytesIO(data), max_pixels)
    except images.CannotRender as exc:
        # NOTE: what formats.jxl_header reads must be what libjxl decodes, for every file it decodes.
        assert 'its header declares' not in str(exc), exc
    try:
        images.render(io.BytesIO(data), variant, io.BytesIO(), max_pixels)
    except images.CannotRender:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {'tus': tus, 'range': range_, 'form': form, 'meta': meta, 'image': image}
#: What each target's modules are, for coverage (Pillow's plugins are Python: its parsers too).
INSTRUMENTED = {
    'tus': ['iss_server.resumable'],
    'range': ['iss_server.responses'],
    'form': ['iss_server.forms'],
    'meta': ['iss_server.meta'],
    'image': ['iss_server.images', 'iss_server.formats', 'PIL'],
}


def image_seeds(directory: pathlib.Path) -> None:
    """A small file of every format this Pillow writes, animated and with EXIF where it can."""
    from PIL import Image, features

    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = 'Camera'
    frames = [Image.new('RGB', (20, 12), colour) for colour in ('red', 'green', 'blue')]
    for name, mode, options in (
        ('PNG', 'RGBA', {}),
        ('JPEG', 'RGB', {'exif': exif}),
        ('JPEG', 'CMYK', {}),
        ('GIF', 'P', {'save_all': True, 'append_images': frames[1:]}),
        ('TIFF', 'RGB', {'save_all': True, 'append_images': frames[1:], 'exif': exif}),
        ('TIFF', 'I;16', {}),
        ('WEBP', 'RGBA', {'save_all': True, 'append_images': frames[1:]}),
        ('BMP', 'RGB', {}),
        ('AVIF', 'RGB', {}),
        # NOTE: an alpha item and a sequence's track: formats.coded_images reads both
        ('AVIF', 'RGBA', {'save_all': True, 'append_images': [frame.convert('RGBA') for frame in frames[1:]]}),
        ('PNG', 'I;16', {}),
        # NOTE: an hvc1 item with its EXIF; an alpha item and a thumbnail item: formats.coded_images reads their SPSs
        ('HEIF', 'RGB', {'exif': exif.tobytes()}),
        ('HEIF', 'RGBA', {'thumbnails': [8]}),
        ('JXL', 'RGB', {'exif': exif.tobytes(), 'use_container': True}),
        ('JXL', 'LA', {'lossless': True}),
        ('JXL', 'I;16', {}),
    ):
        if name == 'AVIF' and not features.check('avif'):
            continue
        buffer = io.BytesIO()
        first = frames[0].convert(mode) if mode != 'I;16' else Image.new('I;16', (20, 12), 300)
        first.save(buffer, name, **options)
        (directory / f'seed-{name.lower()}-{mode.replace(";", "")}').write_bytes(buffer.getvalue())


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f'usage: {sys.argv[0]} {{{",".join(TARGETS)}}} [libFuzzer options]')
    import atheris

    name = sys.argv[1]
    logging.getLogger('iss').setLevel(logging.ERROR)  # NOTE: each refusal is logged; millions of them here
    with atheris.instrument_imports(include=INSTRUMENTED[name]):
        for module in INSTRUMENTED[name]:
            __import__(module)
    seeds = pathlib.Path(tempfile.mkdtemp(prefix=f'iss-fuzz-{name}-'))
    if name == 'image':
        image_seeds(seeds)
    # NOTE: libFuzzer adds what it finds to the first directory: a scratch one, never the repository's.
    corpora = [str(seeds)] + ([str(CORPUS / name)] if (CORPUS / name).is_dir() else [])
    options = [arg for arg in sys.argv[2:] if arg.startswith('-')]
    atheris.Setup([sys.argv[0], *options, *corpora], TARGETS[name])
    atheris.Fuzz()


if __name__ == '__main__':
    main()
