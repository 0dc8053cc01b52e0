"""The browse page, in a real headless Chromium (Debian's, driven by Playwright) against a real gunicorn.

The store is made by the test: 150 images (each its own colour and size) and 50 artifacts of
two kinds. Every test also checks that the page logged no console error and asked no host
but the server.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import pathlib
import re
import shutil
import urllib.parse
import zoneinfo

import pytest
from PIL import Image, ImageChops, ImageStat
from playwright.sync_api import sync_playwright

from iss_testing.data import blob_id, make_png
from iss_testing.servers import Gunicorn

# NOTE: not in the fast subset (pytest -m "not slow"): a real headless Chromium.
pytestmark = pytest.mark.slow

IMAGES, ARTIFACTS = 150, 50
ADMIN = 'browse-admin'
CHROMIUM_FLAGS = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
]


def colour(number: int) -> tuple[int, int, int]:
    return ((number * 37) % 256, (number * 91) % 256, (number * 53) % 256)


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    """A gunicorn with 150 images and 50 artifacts, uploaded oldest first; the images' ids, newest first."""
    directory = tmp_path_factory.mktemp('browse')
    server = Gunicorn(directory / 'data', directory / 'gunicorn.log', ISS_ADMIN_TOKEN=ADMIN)
    images = []
    for number in range(IMAGES):
        png = make_png(200 + number % 7 * 40, 150 + number % 5 * 30, colour(number))
        status, _, body = server.request(
            'POST', f'/images?filename=frame-{number:03d}.png', png, {'Content-Type': 'image/png'}
        )
        assert status == 201
        images.append(json.loads(body)['image_id'])
    for number in range(ARTIFACTS):
        kind = 'model' if number % 2 else 'table'
        status, _, _ = server.request(
            'POST', f'/artifacts?kind={kind}&filename=a{number}.bin', os.urandom(100 + number)
        )
        assert status == 201
    yield server, images[::-1]
    server.stop()


@pytest.fixture(scope='module')
def browser():
    playwright = sync_playwright().start()
    executable = shutil.which('chromium')
    assert executable, 'Debian chromium is needed: apt-get install chromium (.ci/run does)'
    chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture
def page(browser, store):
    """A fresh page on the server, watched: console errors and requests elsewhere fail the test."""
    server, _ = store
    context = browser.new_context(viewport={'width': 1280, 'height': 900})
    page = context.new_page()
    problems: list[str] = []
    page.expected_errors = []  # NOTE: what a test provokes on purpose (the browser logs a refused upload)
    page.on('console', lambda message: message.type == 'error' and problems.append(f'console: {message.text}'))
    page.on('pageerror', lambda error: problems.append(f'page error: {error}'))
    page.on(
        'request',
        lambda request: (
            urllib.parse.urlsplit(request.url).netloc not in (f'127.0.0.1:{server.port}', '')
            and not request.url.startswith(('blob:', 'data:'))
            and problems.append(f'request elsewhere: {request.url}')
        ),
    )
    page.goto(f'{server.url}/')
    yield page
    context.close()
    assert [problem for problem in problems if not any(e in problem for e in page.expected_errors)] == []


def tile_ids(page) -> list[str]:
    return page.eval_on_selector_all('#gallery li', 'tiles => tiles.map(tile => tile.dataset.id)')


def wait_for_thumbnails(page, count: int) -> None:
    page.wait_for_function(
        """count => { const images = [...document.querySelectorAll('#gallery img')].slice(0, count);
        return images.length === count && images.every(image => image.complete && image.naturalWidth > 0); }""",
        arg=count,
    )


def test_the_first_screen_shows_the_newest_thumbnails_rendered_by_iss(page, store):
    server, newest_first = store
    wait_for_thumbnails(page, 12)

    assert tile_ids(page)[:12] == newest_first[:12]
    for index in (0, 5, 11):
        shown = page.evaluate(
            """index => { const image = document.querySelectorAll('#gallery img')[index];
            const canvas = document.createElement('canvas');
            canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
            const context = canvas.getContext('2d'); context.drawImage(image, 0, 0);
            return {src: image.currentSrc, width: canvas.width,
                    pixels: Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)}; }""",
            index,
        )
        path = urllib.parse.urlsplit(shown['src'])
        status, headers, body = server.request(
            'GET', f'{path.path}?{path.query}', headers={'Accept': 'image/avif,image/webp'}
        )
        # NOTE: the page asks JPEG of an image without transparency (these are), WebP of others
        assert status == 200 and headers['Content-Type'] == 'image/jpeg' and 'format=jpeg' in path.query
        derivative = Image.open(io.BytesIO(body)).convert('RGBA')
        assert derivative.size == (shown['width'], len(shown['pixels']) // 4 // shown['width'])
        in_browser = Image.frombytes('RGBA', derivative.size, bytes(shown['pixels']))
        difference = ImageStat.Stat(ImageChops.difference(derivative.convert('RGB'), in_browser.convert('RGB')))
        assert max(difference.mean) < 3, f'tile {index}: the browser shows other pixels than ISS rendered'
        # NOTE: and they are the stored image's: tile i is image 149 - i, a plain colour
        expected = colour(IMAGES - 1 - index)
        assert all(abs(a - b) < 8 for a, b in zip(ImageStat.Stat(derivative).mean[:3], expected, strict=True))


def test_scrolling_loads_every_page_once(page, store):
    _, newest_first = store
    wait_for_thumbnails(page, 12)

    for _ in range(40):
        if len(tile_ids(page)) == IMAGES:
            break
        page.mouse.wheel(0, 4000)
        page.wait_for_timeout(150)

    ids = tile_ids(page)
    assert ids == newest_first and len(set(ids)) == IMAGES


def test_filters_change_the_listing(page, store):
    page.select_option('#filters [name=collection]', 'artifacts')
    page.wait_for_function("() => document.querySelectorAll('#gallery li a.artifact').length >= 20")
    assert page.locator('#gallery li img').count() == 0

    page.fill('#filters [name=kind]', 'model')
    page.click('#filters button[type=submit]')
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery strong')].every(kind => kind.textContent === 'model')"
        " && document.querySelectorAll('#gallery li').length === 25"
    )

    page.fill('#filters [name=created_after]', '2999-01-01T00:00')
    page.click('#filters button[type=submit]')
    page.wait_for_function("() => document.querySelector('#status').textContent === 'Nothing stored matches.'")
    assert page.locator('#gallery li').count() == 0


def test_the_detail_view_shows_the_blobs_meta_and_how_to_fetch_it(page, store):
    server, newest_first = store
    wait_for_thumbnails(page, 1)

    page.click('#gallery li:first-child a')
    page.wait_for_selector('#detail[open] #meta tbody tr')

    stored = json.loads(server.request('GET', f'/images/{newest_first[0]}/meta')[2])
    shown = dict(
        page.eval_on_selector_all(
            '#meta tbody tr',
            'rows => rows.map(r => [r.cells[0].textContent, r.cells[0].nextElementSibling.textContent])',
        )
    )
    assert shown['id'] == newest_first[0] and shown['width'] == str(stored['width'])
    assert shown['filename'] == stored['filename'] == 'frame-149.png' and shown['format'] == 'PNG'
    assert page.text_content('#detail-id') == newest_first[0]
    assert newest_first[0] in page.text_content('#curl')
    assert page.get_attribute('#download', 'href') == f'/images/{newest_first[0]}'
    assert page.eval_on_selector_all('#formats a', 'links => links.map(l => l.textContent)') == [
        'webp',
        'avif',
        'png',
        'jpeg',
    ]
    page.wait_for_function("() => document.querySelector('#detail-figure img').naturalWidth > 0")


def detail_shown(page) -> str:
    """The id the open detail view shows, once its meta is in."""
    page.wait_for_selector('#detail[open] #meta tbody tr')
    return page.text_content('#detail-id')


def test_a_detail_has_its_own_url_opened_directly_and_closed_by_back(page, store):
    server, newest_first = store
    first, second = newest_first[:2]

    page.goto('about:blank')  # NOTE: so the detail's URL loads a new document, as from a bookmark
    page.goto(f'{server.url}/#/images/{first}')
    assert detail_shown(page) == first
    page.keyboard.press('Escape')
    page.wait_for_selector('#detail:not([open])', state='attached')
    assert page.evaluate('() => location.hash') == '', 'closed: the URL names the gallery again'

    wait_for_thumbnails(page, 2)
    assert page.get_attribute('#gallery li:nth-child(2) a', 'href') == f'#/images/{second}', 'a tile is a link'
    entries = page.evaluate('() => history.length')
    page.click('#gallery li:nth-child(2) a')
    assert detail_shown(page) == second
    assert page.evaluate('() => [location.hash, history.length]') == [f'#/images/{second}', entries + 1]

    page.go_back()
    page.wait_for_selector('#detail:not([open])', state='attached')
    assert page.evaluate('() => location.hash') == ''
    page.go_forward()
    assert detail_shown(page) == second
    page.click('#detail .close')  # NOTE: closing goes Back too, so the history is the same either way
    page.wait_for_selector('#detail:not([open])', state='attached')
    assert page.evaluate('() => [location.hash, history.length]') == ['', entries + 1]

    missing = 'sha256:' + '0' * 64
    page.evaluate('missing => { location.hash = `#/images/${missing}`; }', missing)
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('404 ')")
    assert page.evaluate('() => [location.hash, document.querySelector("#detail").open]') == [
        f'#/images/{missing}',
        False,
    ], 'the URL still names what was asked for; the status says why it is not shown'
    page.expected_errors.append('status of 404 (Not Found)')


def test_dates_are_shown_in_the_readers_locale_with_iso_on_hover_and_absent_fields_left_out(browser, store):
    server, newest_first = store
    context = browser.new_context(locale='de-DE', timezone_id='Europe/Berlin')
    page = context.new_page()
    page.goto(f'{server.url}/#/images/{newest_first[0]}')
    detail_shown(page)

    stored = json.loads(server.request('GET', f'/images/{newest_first[0]}/meta')[2])
    moment = datetime.datetime.fromtimestamp(stored['created_at'], datetime.UTC)
    iso = moment.strftime('%Y-%m-%dT%H:%M:%S.') + f'{int(stored["created_at"] * 1000) % 1000:03d}Z'
    local = moment.astimezone(zoneinfo.ZoneInfo('Europe/Berlin'))
    time = page.locator('#meta tr', has_text='created_at').locator('time')
    assert time.get_attribute('title') == time.get_attribute('datetime') == iso
    # NOTE: as Germans write it ("02.12.2026, 18:40"), on the wall clock in Berlin, not a Unix float
    assert time.text_content() == f'{local:%d.%m.%Y, %H:%M}'
    assert str(stored['created_at']) not in page.text_content('#detail')

    absent = [key for key, value in stored.items() if value is None]
    assert absent, 'the seeded PNGs have no EXIF: their camera fields are null'
    rows = page.eval_on_selector_all('#meta th', 'cells => cells.map(cell => cell.textContent)')
    assert not set(absent) & set(rows) and 'null' not in page.text_content('#detail')
    tile = page.locator('#gallery li:first-child time')
    assert tile.get_attribute('title') == iso and tile.text_content() == time.text_content()
    context.close()


def test_the_first_screen_has_placeholder_tiles_before_the_script_and_says_what_it_needs_without(browser, store):
    server, _ = store
    context = browser.new_context(java_script_enabled=False, viewport={'width': 1280, 'height': 900})
    page = context.new_page()
    page.goto(f'{server.url}/')
    assert page.locator('.noscript').is_visible()
    assert 'needs JavaScript' in page.text_content('.noscript')
    assert page.locator('#gallery .skeleton').count() == 12, 'in the HTML, before any script'
    assert not page.locator('#gallery .skeleton').first.is_visible(), 'hidden: without a script they never fill'
    context.close()

    context = browser.new_context(viewport={'width': 1280, 'height': 900})
    page = context.new_page()
    held = []
    page.route(re.compile(r'/browse/browse\.\w+\.js$'), lambda route: held.append(route))
    page.goto(f'{server.url}/', wait_until='commit')  # NOTE: 'load' waits for the script held here
    page.wait_for_selector('#more', state='attached')
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(50)
    assert len(held) == 1, 'the script is asked for, and not answered yet'
    skeleton = page.locator('#gallery .skeleton')
    assert skeleton.count() == 12 and all(skeleton.nth(n).is_visible() for n in range(12))
    assert skeleton.first.bounding_box()['width'] > 150 and not page.locator('.noscript').is_visible()
    held[0].continue_()
    wait_for_thumbnails(page, 12)
    assert page.locator('#gallery .skeleton').count() == 0
    context.close()


def line_breaks(page, selector: str) -> list[str]:
    """Each place where the text of ``selector``'s elements wraps: the character before and after it."""
    return page.eval_on_selector_all(
        selector,
        """elements => elements.flatMap(element => {
            const characters = [];
            const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
            for (let node = walker.nextNode(); node; node = walker.nextNode())
                for (let at = 0; at < node.length; at++) {
                    const range = document.createRange(); range.setStart(node, at); range.setEnd(node, at + 1);
                    const box = range.getClientRects()[0];
                    if (box) characters.push([node.data[at], box.top]);
                }
            return characters.slice(1).flatMap(([character, top], at) =>
                top > characters[at][1] + 2 ? [characters[at][0] + character] : []);
        })""",
    )


def test_mime_types_wrap_at_their_slash_never_inside_a_word(browser, store):
    server, _ = store
    context = browser.new_context(viewport={'width': 390, 'height': 844})
    page = context.new_page()
    page.goto(f'{server.url}/')
    page.select_option('#filters [name=collection]', 'artifacts')
    page.wait_for_function("() => document.querySelectorAll('#gallery .mime').length >= 20")

    whole = '<span>application/</span><wbr><span>octet-stream</span>'
    assert page.eval_on_selector('#gallery .mime', 'e => e.innerHTML') == whole
    breaks = line_breaks(page, '#gallery .mime')
    assert breaks, 'a 120 px tile is too narrow for application/octet-stream on one line'
    assert set(breaks) == {'/o'}, f'wrapped elsewhere than after the slash: {breaks}'

    artifact = page.get_attribute('#gallery li:first-child', 'data-id')
    page.goto(f'{server.url}/#/artifacts/{artifact}')
    assert detail_shown(page) == artifact
    mime = page.locator('#meta tr', has_text='mime').locator('td')
    assert mime.inner_html() == f'<span class="mime">{whole}</span>'
    assert set(line_breaks(page, '#meta .mime')) <= {'/o'}
    context.close()


@pytest.mark.parametrize('width', [1280, 390])
def test_no_placeholder_is_cut(browser, store, width):
    server, _ = store
    context = browser.new_context(viewport={'width': width, 'height': 900})
    page = context.new_page()
    page.goto(f'{server.url}/')
    wait_for_thumbnails(page, 1)
    cut = page.eval_on_selector_all(
        'input[placeholder]',
        """inputs => { const context = document.createElement('canvas').getContext('2d');
        return inputs.flatMap(input => {
            const style = getComputedStyle(input);
            context.font = style.font;
            const room = input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
            return context.measureText(input.placeholder).width > room ? [input.placeholder] : [];
        }); }""",
    )
    assert cut == []
    context.close()


def test_dropping_three_files_shows_each_ones_progress_and_outcome(page, store):
    server, newest_first = store
    fresh = make_png(64, 48, (1, 2, 3))
    already = server.request('GET', f'/images/{newest_first[3]}')[2]
    files = [
        {'name': 'fresh.png', 'type': 'image/png', 'b64': base64.b64encode(fresh).decode()},
        {'name': 'again.png', 'type': 'image/png', 'b64': base64.b64encode(already).decode()},
        {'name': 'notes.txt', 'type': 'text/plain', 'b64': base64.b64encode(b'not an image').decode()},
    ]
    dropped = page.evaluate_handle(
        """files => { const transfer = new DataTransfer();
        for (const file of files) transfer.items.add(new File(
            [Uint8Array.from(atob(file.b64), c => c.charCodeAt(0))], file.name, {type: file.type}));
        return transfer; }""",
        files,
    )

    page.expected_errors.append('status of 415 (Unsupported Media Type)')
    page.dispatch_event('#drop', 'drop', {'dataTransfer': dropped})
    try:
        page.wait_for_function(
            """() => { const rows = document.querySelectorAll('#uploads li');
            return rows.length === 3 && [...rows].every(row => /^(new:|already stored:|\\d{3} |Not an image)/.test(
                row.querySelector('.outcome').textContent)); }"""
        )

        outcomes = page.eval_on_selector_all(
            '#uploads li',
            """rows => rows.map(row => [row.querySelector('.name').textContent,
                row.querySelector('.outcome').textContent,
                row.querySelector('progress').value === row.querySelector('progress').max])""",
        )
        assert outcomes[0][0] == 'fresh.png' and outcomes[0][1].startswith('new: sha256:') and outcomes[0][2]
        assert outcomes[1][1] == f'already stored: {newest_first[3]}' and outcomes[1][2]
        # NOTE: the server's 415 hint names its API; the page tells its own user what to do instead
        assert outcomes[2][1] == (
            'Not an image. To store it as a file, type an artifact kind above (e.g. notes) and drop it again.'
        )
        assert outcomes[2][2] and page.get_attribute('#uploads li:nth-child(3) .outcome', 'class') == 'outcome error'
        page.wait_for_function("id => document.querySelector('#gallery li')?.dataset.id === id", arg=blob_id(fresh))
        wait_for_thumbnails(page, 1)
    finally:
        # NOTE: the store stays as the other tests expect it, whatever happened above
        server.request('DELETE', f'/images/{blob_id(fresh)}', headers={'Authorization': f'Bearer {ADMIN}'})


def test_delete_with_the_admin_token_removes_the_tile_and_the_blob(page, store):
    server, newest_first = store
    victim = make_png(30, 30, (250, 1, 250))
    status, _, body = server.request('POST', '/images', victim, {'Content-Type': 'image/png'})
    victim_id = json.loads(body)['image_id']
    page.reload()
    wait_for_thumbnails(page, 1)
    page.fill('#token-form [name=token]', ADMIN)
    page.click('#token-form button')
    page.wait_for_function("id => document.querySelector('#gallery li')?.dataset.id === id", arg=victim_id)
    page.on('dialog', lambda dialog: dialog.accept())

    page.click('#gallery li:first-child a')
    page.wait_for_selector('#detail[open]')
    # NOTE: as a user would, once the image is shown: a read still on its way would get a 404 and log it
    page.wait_for_function("() => document.querySelector('#detail-figure img')?.naturalWidth > 0")
    page.click('#delete')

    page.wait_for_function('id => !document.querySelector(`#gallery li[data-id="${id}"]`)', arg=victim_id)
    assert server.request('GET', f'/images/{victim_id}')[0] == 404
    assert tile_ids(page)[0] == newest_first[0]


def test_the_page_and_its_assets_are_served_for_caching_under_a_strict_policy(store):
    server, _ = store
    status, headers, body = server.request('GET', '/')
    assert status == 200 and headers['Cache-Control'] == 'no-cache'
    assert "default-src 'none'; script-src 'self'" in headers['Content-Security-Policy']
    assert b'<script' in body and b'<script>' not in body, 'no inline script'
    assert server.request('GET', '/', headers={'If-None-Match': headers['ETag']})[0] == 304
    assets = re.findall(rb'/browse/[\w.]+\.(?:js|css|svg)', body)
    assert len(assets) == 3
    for asset in assets:
        status, headers, _ = server.request('GET', asset.decode())
        assert status == 200 and headers['Cache-Control'] == 'public, max-age=31536000, immutable'
    assert server.request('GET', '/browse/nothing.js')[0] == 404
    assert server.request('GET', '/browse')[2] == body


def test_screenshots_of_the_gallery_the_detail_and_a_phone(page, browser, store, tmp_path):
    """The README's pictures, taken here; ISS_SCREENSHOTS=docs writes them into the tree."""
    server, newest_first = store
    out = pathlib.Path(os.environ.get('ISS_SCREENSHOTS') or tmp_path)
    wait_for_thumbnails(page, 20)
    gallery = page.screenshot(path=str(out / 'browse-gallery.png'))
    page.goto('about:blank')
    page.goto(f'{server.url}/#/images/{newest_first[0]}')
    page.wait_for_function("() => document.querySelector('#detail-figure img')?.naturalWidth > 0")
    detail = page.screenshot(path=str(out / 'browse-detail.png'))

    context = browser.new_context(viewport={'width': 390, 'height': 844}, device_scale_factor=2)
    phone = context.new_page()
    phone.goto(f'{server.url}/')
    wait_for_thumbnails(phone, 12)
    small = phone.screenshot(path=str(out / 'browse-phone.png'))
    context.close()
    assert gallery[:8] == detail[:8] == small[:8] == b'\x89PNG\r\n\x1a\n'


def test_the_page_works_by_keyboard_and_at_phone_width(browser, store):
    server, newest_first = store
    context = browser.new_context(viewport={'width': 375, 'height': 740}, device_scale_factor=2)
    page = context.new_page()
    page.goto(f'{server.url}/')
    wait_for_thumbnails(page, 2)

    assert page.evaluate('() => document.documentElement.scrollWidth <= window.innerWidth'), 'no sideways scrolling'
    assert page.get_attribute('#gallery img', 'alt').startswith('frame-149.png, ')
    assert '512' in page.evaluate("() => document.querySelector('#gallery img').currentSrc"), 'the 2x thumbnail'
    page.focus('#gallery li:first-child a')
    page.keyboard.press('Enter')
    page.wait_for_selector('#detail[open]')
    assert page.text_content('#detail-id') == newest_first[0]
    page.keyboard.press('Escape')
    page.wait_for_selector('#detail:not([open])', state='attached')
    context.close()


@pytest.fixture(scope='module')
def private_store(tmp_path_factory):
    directory = tmp_path_factory.mktemp('private')
    server = Gunicorn(directory / 'data', directory / 'gunicorn.log', ISS_READ_TOKEN='reader')
    status, _, body = server.request('POST', '/images', make_png(90, 60, (10, 200, 30)), {'Content-Type': 'image/png'})
    assert status == 201
    yield server, json.loads(body)['image_id']
    server.stop()


def test_a_private_store_is_read_with_the_token_given_to_the_page(browser, private_store):
    server, image_id = private_store
    context = browser.new_context()
    page = context.new_page()
    page.goto(f'{server.url}/')

    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('401 Token required')")
    page.fill('#token-form [name=token]', 'reader')
    page.click('#token-form button')
    wait_for_thumbnails(page, 1)

    assert tile_ids(page) == [image_id]
    assert page.evaluate("() => document.querySelector('#gallery img').src").startswith('blob:')
    page.reload()  # NOTE: kept for the browser session, not asked again
    wait_for_thumbnails(page, 1)
    context.close()


def test_a_private_stores_detail_url_opens_once_the_page_has_the_token(browser, private_store):
    server, image_id = private_store
    context = browser.new_context()
    page = context.new_page()
    page.goto(f'{server.url}/#/images/{image_id}')
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('401 Token required')")
    assert not page.evaluate('() => document.querySelector("#detail").open')

    page.fill('#token-form [name=token]', 'reader')
    page.click('#token-form button')
    page.wait_for_selector('#detail[open] #meta tbody tr')
    assert page.text_content('#detail-id') == image_id
    page.wait_for_function("() => document.querySelector('#detail-figure img')?.naturalWidth > 0")
    context.close()


def test_a_large_drop_goes_over_tus_in_chunks(page, store):
    server, _ = store
    page.fill('#upload-kind', 'video')
    size = 70 * 1024 * 1024  # NOTE: over the page's 64 MiB threshold: five chunks of 16 MiB
    dropped = page.evaluate_handle(
        """size => { const bytes = new Uint8Array(size);
        for (let at = 0; at < size; at += 65536) crypto.getRandomValues(bytes.subarray(at, at + 65536));
        window.droppedBytes = bytes;
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'capture.bin', {type: 'application/octet-stream'}));
        return transfer; }""",
        size,
    )
    expected = page.evaluate(
        """async () => 'sha256:' + [...new Uint8Array(await crypto.subtle.digest('SHA-256', window.droppedBytes))]
        .map(b => b.toString(16).padStart(2, '0')).join('')"""
    )

    page.dispatch_event('#drop', 'drop', {'dataTransfer': dropped})
    # NOTE: "100%" is progress, not an answer: a status is three digits and a space
    page.wait_for_function(
        """() => /^(new|already stored|\\d{3} |the connection)/.test(
            document.querySelector('#uploads .outcome')?.textContent)""",
        timeout=120_000,
    )

    assert page.text_content('#uploads .outcome') == f'new: {expected}'
    metrics = server.request('GET', '/metrics')[2].decode()
    patches = re.search(r'method="PATCH",route="/uploads/\{upload_id\}",status="204"\} (\S+)', metrics)
    assert patches and float(patches.group(1)) >= 5
    meta = json.loads(server.request('GET', f'/artifacts/{expected}/meta')[2])
    assert (meta['kind'], meta['filename'], meta['bytes']) == ('video', 'capture.bin', size)
    assert server.request('DELETE', f'/artifacts/{expected}', headers={'Authorization': f'Bearer {ADMIN}'})[0] == 204
