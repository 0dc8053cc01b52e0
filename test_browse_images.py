"""The browse page's images from issue 27, in a real headless Chromium against a real gunicorn:
placeholders (ThumbHash) painted while the thumbnails are held back, and the detail's "Similar" strip.
"""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image, ImageStat

from bench.near_duplicates import picture
from iss_server import placeholders
from iss_testing.servers import Gunicorn
from test_browse import browser  # noqa: F401  NOTE: the module's Chromium, as test_browse.py starts it

pytestmark = pytest.mark.slow


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, 'PNG')
    return buffer.getvalue()


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    """Three distinct pictures and a smaller copy of the first; their upload answers, in upload order."""
    directory = tmp_path_factory.mktemp('browse-images')
    server = Gunicorn(directory / 'data', directory / 'gunicorn.log')
    answers = []
    for number, image in enumerate([picture(20), picture(21), picture(22), picture(20).resize((200, 150))]):
        status, _, body = server.request(
            'POST', f'/images?filename=p{number}.png', png(image), {'Content-Type': 'image/png'}
        )
        assert status == 201
        answers.append(json.loads(body))
    yield server, answers
    server.stop()


@pytest.fixture
def page(browser, store):  # noqa: F811
    server, _ = store
    context = browser.new_context(viewport={'width': 1280, 'height': 900})
    page = context.new_page()
    problems: list[str] = []
    page.on('console', lambda message: message.type == 'error' and problems.append(f'console: {message.text}'))
    page.on('pageerror', lambda error: problems.append(f'page error: {error}'))
    yield page
    context.close()
    assert problems == []


def test_placeholders_are_painted_while_the_thumbnails_are_held_back_then_give_way(page, store):
    server, answers = store
    held = []
    page.route(re.compile(r'/images/sha256:[0-9a-f]{64}\?w='), lambda route: held.append(route))  # NOTE: held
    page.goto(f'{server.url}/')

    page.wait_for_function("() => document.querySelectorAll('#gallery canvas.placeholder').length === 4")
    painted = page.evaluate(
        """() => [...document.querySelectorAll('#gallery li')].map(tile => {
            const canvas = tile.querySelector('canvas.placeholder');
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            const pixels = data.length / 4;
            const mean = [0, 1, 2].map(c => data.filter((_, i) => i % 4 === c).reduce((a, b) => a + b, 0) / pixels);
            return {id: tile.dataset.id, size: [canvas.width, canvas.height], mean,
                    waiting: tile.querySelector('a').classList.contains('waiting')}; })"""
    )

    thumbhashes = {answer['image_id']: answer['thumbhash'] for answer in answers}
    assert {tile['id'] for tile in painted} == set(thumbhashes) and all(tile['waiting'] for tile in painted)
    for tile in painted:
        # NOTE: the page's decoder paints what the server's (the reference's port) decodes, cropped square.
        decoded = placeholders.thumbhash_to_image(thumbhashes[tile['id']])
        side = min(decoded.size)
        left, top = (decoded.width - side) // 2, (decoded.height - side) // 2
        expected = ImageStat.Stat(decoded.crop((left, top, left + side, top + side)).convert('RGB')).mean
        assert tile['size'] == [side, side]
        assert all(abs(a - b) < 6 for a, b in zip(tile['mean'], expected, strict=True)), (tile, expected)
    assert len(base64.b64decode(answers[0]['thumbhash'])) < 40

    for route in held:
        route.continue_()
    page.wait_for_function(
        """() => [...document.querySelectorAll('#gallery img')].every(image => image.complete && image.naturalWidth)
        && !document.querySelector('#gallery canvas.placeholder, #gallery .waiting')"""
    )


def test_the_detail_shows_a_strip_of_the_similar_images(page, store):
    server, answers = store
    original, copy = answers[0]['image_id'], answers[3]['image_id']
    page.goto(f'{server.url}/#/images/{original}')

    page.wait_for_selector('#similar li a img')
    strip = page.eval_on_selector_all(
        '#similar li a', 'links => links.map(link => [link.getAttribute("href"), link.textContent])'
    )
    assert [href for href, _ in strip] == [f'#/images/{copy}']
    assert re.fullmatch(r'\d+ bits', strip[0][1])
    page.wait_for_function("() => document.querySelector('#similar img').naturalWidth > 0")

    page.click('#similar li a')  # NOTE: the strip leads to the copy's own detail, whose strip names the original
    page.wait_for_function(f"() => document.querySelector('#detail-id').textContent === '{copy}'")
    page.wait_for_function(
        f"() => [...document.querySelectorAll('#similar li a')].map(a => a.getAttribute('href')).join() "
        f"=== '#/images/{original}'"
    )

    page.goto(f'{server.url}/#/images/{answers[1]["image_id"]}')
    page.wait_for_function("() => document.querySelector('#similar p').textContent === 'No near-duplicates stored.'")
