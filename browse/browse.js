// The browse page: a gallery of the store from its listings, a detail view, uploads and deletes.
// Plain ES module, no build step, nothing from another host; every request goes to this server.

const PAGE = 100; // a first screen of a large display holds about this many tiles
const TILE = 256; // CSS pixels of a thumbnail; srcset asks 1x and 2x of it
const $ = (selector) => document.querySelector(selector);
const state = {
  next: null,
  loading: false,
  generation: 0, // NOTE: counts restarts, so a page of a listing the filters replaced is dropped
  seen: new Set(),
  filters: {},
  collection: 'images',
  current: null,
};

// -- the token: kept for this browser session only -------------------------------------
const token = () => sessionStorage.getItem('iss-token') || '';
const authorized = (headers = {}) => (token() ? { ...headers, Authorization: `Bearer ${token()}` } : headers);

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authorized(options.headers) });
  if (!response.ok) throw await problem(response);
  return response;
}

async function problem(response) {
  try {
    const body = await response.json();
    return new Error(`${response.status} ${body.title}: ${body.description}`);
  } catch {
    return new Error(`${response.status} ${response.statusText}`);
  }
}

// An image's bytes: by URL while reads are public; with a token, fetched with it (an <img> cannot send one).
async function show(img, url) {
  if (!token()) {
    img.src = url;
    return;
  }
  const response = await api(url);
  img.src = URL.createObjectURL(await response.blob());
}

// PERF: a cold cache renders every thumbnail of the first screen, so the format is the
// cheapest to encode that keeps the image: JPEG (4.8 ms for a 1280x720 photo) when it has no
// transparency, else WebP (10 ms); AVIF (format=auto) takes 18 ms.
const OPAQUE_MODES = new Set(['1', 'L', 'RGB', 'CMYK', 'YCbCr', 'I;16', 'I', 'F']);
const thumbnailFormat = (item) => (OPAQUE_MODES.has(item.mode) ? 'jpeg' : 'webp');
const thumbnail = (item, width) =>
  `/images/${item.id}?w=${width}&h=${width}&fit=cover&format=${thumbnailFormat(item)}`;

// -- placeholders: an image's ThumbHash (its meta's thumbhash) painted while its thumbnail loads ----

// Evan Wallace's reference decoder (thumbhash.js, thumbHashToRGBA; MIT): the ~25 bytes to a small
// RGBA picture, 32 pixels on its longer side. NOTE: painted on a <canvas>: the page's policy takes
// images from this server and blob: URLs only, no data: URL.
function thumbHashToRGBA(hash) {
  const { PI, min, max, cos, round } = Math;
  const header24 = hash[0] | (hash[1] << 8) | (hash[2] << 16);
  const header16 = hash[3] | (hash[4] << 8);
  const lDc = (header24 & 63) / 63;
  const pDc = ((header24 >> 6) & 63) / 31.5 - 1;
  const qDc = ((header24 >> 12) & 63) / 31.5 - 1;
  const lScale = ((header24 >> 18) & 31) / 31;
  const hasAlpha = header24 >> 23;
  const pScale = ((header16 >> 3) & 63) / 63;
  const qScale = ((header16 >> 9) & 63) / 63;
  const isLandscape = header16 >> 15;
  const lx = max(3, isLandscape ? (hasAlpha ? 5 : 7) : header16 & 7);
  const ly = max(3, isLandscape ? header16 & 7 : hasAlpha ? 5 : 7);
  const aDc = hasAlpha ? (hash[5] & 15) / 15 : 1;
  const aScale = (hash[5] >> 4) / 15;
  const acStart = hasAlpha ? 6 : 5;
  let acIndex = 0;
  const decodeChannel = (nx, ny, scale) => {
    const ac = [];
    for (let cy = 0; cy < ny; cy++)
      for (let cx = cy ? 0 : 1; cx * ny < nx * (ny - cy); cx++)
        ac.push((((hash[acStart + (acIndex >> 1)] >> ((acIndex++ & 1) << 2)) & 15) / 7.5 - 1) * scale);
    return ac;
  };
  const lAc = decodeChannel(lx, ly, lScale);
  const pAc = decodeChannel(3, 3, pScale * 1.25);
  const qAc = decodeChannel(3, 3, qScale * 1.25);
  const aAc = hasAlpha && decodeChannel(5, 5, aScale);
  const ratio = thumbHashRatio(hash);
  const w = round(ratio > 1 ? 32 : 32 * ratio);
  const h = round(ratio > 1 ? 32 / ratio : 32);
  const rgba = new Uint8ClampedArray(w * h * 4);
  const fx = [];
  const fy = [];
  for (let y = 0, i = 0; y < h; y++) {
    for (let x = 0; x < w; x++, i += 4) {
      let l = lDc;
      let p = pDc;
      let q = qDc;
      let a = aDc;
      for (let cx = 0, n = max(lx, hasAlpha ? 5 : 3); cx < n; cx++) fx[cx] = cos((PI / w) * (x + 0.5) * cx);
      for (let cy = 0, n = max(ly, hasAlpha ? 5 : 3); cy < n; cy++) fy[cy] = cos((PI / h) * (y + 0.5) * cy);
      for (let cy = 0, j = 0; cy < ly; cy++)
        for (let cx = cy ? 0 : 1, fy2 = fy[cy] * 2; cx * ly < lx * (ly - cy); cx++, j++) l += lAc[j] * fx[cx] * fy2;
      for (let cy = 0, j = 0; cy < 3; cy++) {
        for (let cx = cy ? 0 : 1, fy2 = fy[cy] * 2; cx < 3 - cy; cx++, j++) {
          const f = fx[cx] * fy2;
          p += pAc[j] * f;
          q += qAc[j] * f;
        }
      }
      if (hasAlpha)
        for (let cy = 0, j = 0; cy < 5; cy++)
          for (let cx = cy ? 0 : 1, fy2 = fy[cy] * 2; cx < 5 - cy; cx++, j++) a += aAc[j] * fx[cx] * fy2;
      const b = l - (2 / 3) * p;
      const r = (3 * l - b + q) / 2;
      const g = r - q;
      rgba[i] = max(0, 255 * min(1, r));
      rgba[i + 1] = max(0, 255 * min(1, g));
      rgba[i + 2] = max(0, 255 * min(1, b));
      rgba[i + 3] = max(0, 255 * min(1, a));
    }
  }
  return { w, h, rgba };
}

function thumbHashRatio(hash) {
  const hasAlpha = hash[2] & 0x80;
  const isLandscape = hash[4] & 0x80;
  const lx = isLandscape ? (hasAlpha ? 5 : 7) : hash[3] & 7;
  const ly = isLandscape ? hash[3] & 7 : hasAlpha ? 5 : 7;
  return lx / ly;
}

// A canvas that shows the ThumbHash cropped to a square, as the thumbnail (fit=cover) will be;
// null for an image without one (stored before them, or whose pixels do not decode).
function placeholder(item) {
  if (!item.thumbhash) return null;
  let decoded;
  try {
    decoded = thumbHashToRGBA(Uint8Array.from(atob(item.thumbhash), (c) => c.charCodeAt(0)));
  } catch {
    return null;
  }
  const { w, h, rgba } = decoded;
  const source = document.createElement('canvas');
  source.width = w;
  source.height = h;
  source.getContext('2d').putImageData(new ImageData(rgba, w, h), 0, 0);
  const side = Math.min(w, h);
  const canvas = document.createElement('canvas');
  canvas.className = 'placeholder';
  canvas.setAttribute('aria-hidden', 'true');
  canvas.width = canvas.height = side;
  canvas.getContext('2d').drawImage(source, (w - side) / 2, (h - side) / 2, side, side, 0, 0, side, side);
  return canvas;
}

// An <img> over its placeholder: the tile says "loaded" (and the placeholder goes) once the thumbnail is in.
function overPlaceholder(img, holder, item) {
  const canvas = placeholder(item);
  if (!canvas) return;
  holder.classList.add('waiting');
  holder.prepend(canvas);
  const done = () => {
    holder.classList.remove('waiting');
    canvas.remove();
  };
  img.addEventListener('load', done, { once: true });
}

// -- how values are shown ----------------------------------------------------------------------
const DATE = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

// A moment as the reader's locale writes it, its ISO 8601 form on hover; created_at is Unix
// seconds, captured_at ISO text (without an offset, the camera's wall clock: read as local time).
function when(value) {
  const date = typeof value === 'number' ? new Date(value * 1000) : new Date(value);
  if (Number.isNaN(date.getTime())) return null;
  const element = document.createElement('time');
  element.dateTime = element.title = typeof value === 'number' ? date.toISOString() : value;
  element.textContent = DATE.format(date);
  return element;
}

// A MIME type may wrap after its slash (or a dot or plus), never inside a word: each part is
// kept whole (not even broken at its hyphen), with a <wbr> between: application/<wbr>octet-stream.
function breakable(text) {
  const element = document.createElement('span');
  element.className = 'mime';
  for (const part of text.split(/(?<=[/.+])/)) {
    if (element.childNodes.length) element.append(document.createElement('wbr'));
    const whole = document.createElement('span');
    whole.textContent = part;
    element.append(whole);
  }
  return element;
}

function size(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(1) : value}\u00a0${units[unit]}`; // NOTE: no break inside "2.9 KiB"
}

// The detail's rows: how a field is shown when it is not plain text.
const FIELDS = new Map([
  ['created_at', when],
  ['captured_at', when],
  ['mime', breakable],
  ['bytes', (bytes) => (bytes >= 1024 ? `${size(bytes)} (${bytes.toLocaleString()} bytes)` : size(bytes))],
]);

// The fields a reader looks for first; the rest follow in the order the server wrote them.
const FIRST_FIELDS = ['id', 'filename', 'kind', 'created_at', 'captured_at', 'mime', 'bytes', 'width', 'height'];

function fieldContent(key, value) {
  const special = FIELDS.get(key)?.(value);
  if (special) return special;
  return typeof value === 'object' ? JSON.stringify(value) : String(value);
}

// -- the gallery --------------------------------------------------------------------------
function query() {
  const params = new URLSearchParams({ limit: String(PAGE) });
  for (const [name, value] of Object.entries(state.filters)) if (value) params.set(name, value);
  return `/${state.collection}?${params}`;
}

async function loadMore() {
  if (state.loading || state.next === undefined) return;
  state.loading = true;
  const generation = state.generation;
  const first = state.next === null;
  let page;
  let failure;
  try {
    page = await (await api(state.next || query())).json();
  } catch (error) {
    failure = error;
  } finally {
    state.loading = false;
  }
  // NOTE: the filters changed while this page was on its way: it is not theirs
  if (generation !== state.generation) return loadMore();
  const gallery = $('#gallery');
  // NOTE: a first page replaces the placeholder tiles, or the listing of the filters before
  if (first) gallery.replaceChildren();
  gallery.removeAttribute('aria-busy');
  if (failure) {
    setStatus(failure.message);
    state.next = undefined;
    return;
  }
  for (const item of page.items) if (!state.seen.has(item.id)) addTile(item);
  state.next = page.next || undefined;
  setStatus(state.seen.size ? '' : 'Nothing stored matches.');
  // NOTE: a tall screen may show the sentinel still: keep filling it
  if (state.next !== undefined && visible($('#more'))) loadMore();
}

function visible(element) {
  const box = element.getBoundingClientRect();
  return box.top < window.innerHeight + 400;
}

function addTile(item) {
  state.seen.add(item.id);
  const tile = document.createElement('li');
  tile.dataset.id = item.id;
  const link = document.createElement('a');
  link.href = detailHash(state.collection, item.id);
  const name = item.filename || item.id.slice(7, 19);
  if (state.collection === 'images') {
    const img = document.createElement('img');
    img.alt = `${name}, ${item.width}×${item.height} ${item.format || ''}`.trim();
    img.loading = 'lazy';
    img.decoding = 'async';
    img.width = img.height = TILE;
    overPlaceholder(img, link, item);
    if (token()) show(img, thumbnail(item, TILE * (window.devicePixelRatio > 1 ? 2 : 1)));
    else {
      img.srcset = `${thumbnail(item, TILE)} 1x, ${thumbnail(item, TILE * 2)} 2x`;
      img.src = thumbnail(item, TILE);
    }
    const caption = document.createElement('span');
    caption.className = 'caption';
    const label = document.createElement('span');
    label.className = 'name';
    label.textContent = name;
    caption.append(label, when(item.created_at) || '');
    link.append(img, caption);
    link.setAttribute('aria-label', `Open ${name}`);
  } else {
    link.classList.add('artifact');
    const title = document.createElement('strong');
    title.textContent = item.kind;
    const label = document.createElement('span');
    label.className = 'name';
    label.textContent = name;
    const bytes = document.createElement('span');
    bytes.textContent = size(item.bytes);
    link.append(title, label, item.mime ? breakable(item.mime) : '', bytes, when(item.created_at) || '');
    link.setAttribute('aria-label', `Open ${item.kind} ${name}`);
  }
  tile.append(link);
  $('#gallery').append(tile);
}

function setStatus(text) {
  $('#status').textContent = text;
}

// Start the listing over (the filters or the token changed); the tiles shown stay until its first page comes.
function restart() {
  state.generation += 1;
  state.next = null;
  state.seen.clear();
  $('#gallery').setAttribute('aria-busy', 'true');
  loadMore();
}

function applyFilters(event) {
  event?.preventDefault();
  const form = new FormData($('#filters'));
  state.collection = form.get('collection');
  const time = (value) => (value ? new Date(value).toISOString() : '');
  state.filters = {
    kind: state.collection === 'artifacts' ? (form.get('kind') || '').trim() : '',
    created_after: time(form.get('created_after')),
    created_before: time(form.get('created_before')),
  };
  $('#filters [name=kind]').disabled = state.collection !== 'artifacts';
  restart();
}

// -- one blob: its own URL, #/images/<id> or #/artifacts/<id> -----------------------------------
const DETAIL_ROUTE = /^#\/(images|artifacts)\/(sha256:[0-9a-f]{64})$/;
const detailHash = (collection, id) => `#/${collection}/${id}`;

// Show what the URL names: a detail route opens that blob, any other closes the detail.
// NOTE: the only place the detail opens or closes: closing it is a change of URL (leaveDetail)
function route(event) {
  const match = DETAIL_ROUTE.exec(location.hash);
  if (!match) {
    if ($('#detail').open) $('#detail').close();
    return;
  }
  // NOTE: opened from the gallery of this document: closing it goes Back there, so Back and
  // the close button leave the same history
  if (event && !DETAIL_ROUTE.test(new URL(event.oldURL).hash)) history.replaceState({ overGallery: true }, '');
  openDetail(match[2], match[1]);
}

// Close the detail (its button, Escape, a delete) by going to the gallery's URL.
function leaveDetail() {
  if (!DETAIL_ROUTE.test(location.hash)) return;
  if (history.state?.overGallery) {
    history.back();
    return;
  }
  history.replaceState(null, '', location.pathname + location.search);
  route();
}

async function openDetail(id, collection) {
  const dialog = $('#detail');
  let meta;
  try {
    meta = await (await api(`/${collection}/${id}/meta`)).json();
  } catch (error) {
    // NOTE: the URL stays: it names what was asked for (a private store shows it once given a token)
    setStatus(error.message);
    return;
  }
  // NOTE: the URL moved on while the meta was on its way
  if (location.hash !== detailHash(collection, id)) return;
  state.current = { id, collection };
  $('#detail-title').textContent = meta.filename || id;
  $('#detail-id').textContent = id;
  const figure = $('#detail-figure');
  figure.replaceChildren();
  const formats = $('#formats');
  formats.replaceChildren();
  const strip = $('#similar');
  strip.hidden = collection !== 'images';
  $('#similar ul').replaceChildren();
  if (collection === 'images') {
    showSimilar(id);
    const img = document.createElement('img');
    img.alt = `${meta.filename || id}, ${meta.width}×${meta.height}`;
    const screen = Math.min(2048, Math.round(Math.max(window.innerWidth, 320) * (window.devicePixelRatio || 1)));
    show(img, `/images/${id}?w=${screen}&format=auto`);
    figure.append(img);
    for (const format of ['webp', 'avif', 'png', 'jpeg']) {
      const link = document.createElement('a');
      link.href = `/images/${id}?w=1024&format=${format}`;
      link.textContent = format;
      formats.append(' ', link);
    }
  }
  const download = $('#download');
  download.href = `/${collection}/${id}`;
  download.download = meta.filename || id.slice(7);
  const auth = token() ? ' -H "Authorization: Bearer $ISS_TOKEN"' : '';
  $('#curl').textContent = `curl${auth} -o '${(meta.filename || id.slice(7)).replaceAll("'", '')}' ${location.origin}/${collection}/${id}`;
  // NOTE: a field the blob does not have (null: no camera, no capture time) is left out, not shown as null
  const present = Object.entries({ id, ...meta }).filter(([, value]) => value !== null && value !== '');
  const rank = (key) => (FIRST_FIELDS.includes(key) ? FIRST_FIELDS.indexOf(key) : FIRST_FIELDS.length);
  const rows = present.sort(([a], [b]) => rank(a) - rank(b)).map(([key, value]) => {
    const row = document.createElement('tr');
    const name = document.createElement('th');
    name.scope = 'row';
    name.textContent = key;
    const cell = document.createElement('td');
    cell.append(fieldContent(key, value));
    row.append(name, cell);
    return row;
  });
  $('#meta tbody').replaceChildren(...rows);
  if (!dialog.open) dialog.showModal();
}

// The detail's "Similar" strip: the stored near-duplicates of the image (GET /images/{id}/similar), nearest first.
const SIMILAR = 8;
const SIMILAR_TILE = 96;

async function showSimilar(id) {
  const list = $('#similar ul');
  const note = $('#similar p');
  note.textContent = 'Looking…';
  let found;
  try {
    found = await (await api(`/images/${id}/similar?limit=${SIMILAR}`)).json();
  } catch (error) {
    note.textContent = error.message;
    return;
  }
  if (state.current?.id !== id) return; // NOTE: another detail opened meanwhile
  note.textContent = found.items.length ? '' : 'No near-duplicates stored.';
  list.replaceChildren(
    ...found.items.map((item) => {
      const entry = document.createElement('li');
      const link = document.createElement('a');
      link.href = detailHash('images', item.id);
      const img = document.createElement('img');
      img.alt = `${item.filename || item.id.slice(7, 19)}, ${item.distance} bits apart`;
      img.width = img.height = SIMILAR_TILE;
      overPlaceholder(img, link, item);
      show(img, `/images/${item.id}?w=${SIMILAR_TILE * 2}&h=${SIMILAR_TILE * 2}&fit=cover&format=${thumbnailFormat(item)}`);
      const distance = document.createElement('span');
      distance.className = 'distance';
      distance.textContent = `${item.distance} bits`;
      link.append(img, distance);
      entry.append(link);
      return entry;
    }),
  );
}

async function deleteCurrent() {
  const { id, collection } = state.current;
  if (!confirm(`Delete ${id}? Its bytes, meta and derivatives go, for every door.`)) return;
  try {
    await api(`/${collection}/${id}`, { method: 'DELETE' });
    document.querySelector(`#gallery li[data-id="${id}"]`)?.remove();
    state.seen.delete(id);
    leaveDetail();
    setStatus(`Deleted ${id}.`);
  } catch (error) {
    setStatus(error.message);
  }
}

// -- uploads -------------------------------------------------------------------------------
function upload(file) {
  const kind = $('#upload-kind').value.trim();
  const row = document.createElement('li');
  const name = document.createElement('span');
  name.className = 'name';
  name.textContent = file.name;
  const bar = document.createElement('progress');
  bar.max = file.size || 1;
  bar.value = 0;
  bar.setAttribute('aria-label', `Upload of ${file.name}`);
  const outcome = document.createElement('span');
  outcome.className = 'outcome';
  outcome.textContent = 'waiting';
  row.append(name, bar, outcome);
  $('#uploads').append(row);

  const shown = (status, body, headers = {}) => {
    bar.value = bar.max;
    if (status === 201 || status === 200) {
      const id = headers.blob || body.image_id || body.artifact_id;
      outcome.className = `outcome ${status === 201 ? 'new' : 'stored'}`;
      outcome.textContent = `${status === 201 ? 'new' : 'already stored'}: ${id}`;
    } else if (status === 415 && !kind) {
      // NOTE: the server's hint names its API; this page's user stores such a file with the kind field
      outcome.className = 'outcome error';
      outcome.textContent =
        'Not an image. To store it as a file, type an artifact kind above (e.g. notes) and drop it again.';
    } else {
      outcome.className = 'outcome error';
      outcome.textContent = status
        ? `${status} ${body.title || 'error'}: ${body.description || ''}`
        : 'the connection failed';
    }
    return status;
  };
  const progress = (done) => {
    bar.value = done;
    outcome.textContent = `${Math.round((100 * done) / (file.size || 1))}%`;
  };
  if (file.size >= RESUMABLE_BYTES) return uploadResumably(file, kind, progress, shown);
  const form = new FormData();
  form.append('file', file, file.name);
  const path = kind ? `/artifacts?kind=${encodeURIComponent(kind)}` : '/images';
  return send('POST', path, {}, form, progress).then(({ status, body }) => shown(status, body));
}

// One request by XMLHttpRequest (fetch reports no upload progress): its status, JSON body and
// the named response headers; status 0 when the connection failed.
function send(method, path, headers, body, onProgress = () => {}, wanted = []) {
  return new Promise((resolve) => {
    const request = new XMLHttpRequest();
    request.open(method, path);
    for (const [header, value] of Object.entries(authorized(headers))) request.setRequestHeader(header, value);
    request.upload.addEventListener('progress', (event) => onProgress(event.loaded));
    request.addEventListener('load', () => {
      let json = {};
      try {
        json = JSON.parse(request.responseText);
      } catch {}
      const named = Object.fromEntries(wanted.map((name) => [name, request.getResponseHeader(name)]));
      resolve({ status: request.status, body: json, headers: named });
    });
    request.addEventListener('error', () => resolve({ status: 0, body: {}, headers: {} }));
    request.send(body);
  });
}

// A large file goes over tus (/uploads) in chunks: a broken connection costs one chunk, then
// HEAD says where the server has it and the rest follows from there.
const RESUMABLE_BYTES = 64 * 1024 * 1024;
const RESUMABLE_CHUNK = 16 * 1024 * 1024;
const TUS = { 'Tus-Resumable': '1.0.0' };
const base64 = (text) => btoa(String.fromCharCode(...new TextEncoder().encode(text)));

async function uploadResumably(file, kind, progress, shown) {
  const fields = { kind: kind || 'image', filename: file.name, ...(file.type ? { filetype: file.type } : {}) };
  const metadata = Object.entries(fields).map(([key, value]) => `${key} ${base64(value)}`).join(',');
  const created = await send('POST', '/uploads', { ...TUS, 'Upload-Length': String(file.size), 'Upload-Metadata': metadata }, null, undefined, ['Location']);
  if (created.status !== 201) return shown(created.status, created.body);
  const location = created.headers.Location;
  const wanted = ['Upload-Offset', 'ISS-Blob-Id', 'ISS-Blob-Status'];
  let offset = 0;
  let failures = 0;
  for (;;) {
    const chunk = file.slice(offset, offset + RESUMABLE_CHUNK);
    const headers = { ...TUS, 'Upload-Offset': String(offset), 'Content-Type': 'application/offset+octet-stream' };
    const answer = await send('PATCH', location, headers, chunk, (sent) => progress(offset + sent), wanted);
    if (answer.status === 204) {
      failures = 0;
      offset = Number(answer.headers['Upload-Offset']);
      progress(offset);
      if (answer.headers['ISS-Blob-Id']) {
        return shown(Number(answer.headers['ISS-Blob-Status']), {}, { blob: answer.headers['ISS-Blob-Id'] });
      }
      continue;
    }
    const retryable = answer.status === 0 || answer.status === 409 || answer.status >= 500;
    if (!retryable || ++failures > 5) return shown(answer.status, answer.body);
    await new Promise((wait) => setTimeout(wait, 250 * 2 ** failures));
    const head = await send('HEAD', location, TUS, null, undefined, wanted);
    if (head.status !== 200) return shown(head.status, head.body);
    if (head.headers['ISS-Blob-Id']) {
      // NOTE: the last chunk was committed; only its answer was lost
      return shown(Number(head.headers['ISS-Blob-Status']), {}, { blob: head.headers['ISS-Blob-Id'] });
    }
    offset = Number(head.headers['Upload-Offset']);
  }
}

async function uploadAll(files) {
  const statuses = await Promise.all([...files].map(upload));
  if (statuses.includes(201)) restart();
}

function wireDrop() {
  const drop = $('#drop');
  drop.addEventListener('dragover', (event) => {
    event.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    uploadAll(event.dataTransfer.files);
  });
  drop.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' || event.key === ' ') $('#pick').click();
  });
  $('#pick').addEventListener('change', (event) => uploadAll(event.target.files));
}

// -- start ---------------------------------------------------------------------------------
function start() {
  $('#filters').addEventListener('submit', applyFilters);
  $('#filters [name=collection]').addEventListener('change', applyFilters);
  $('#token-form [name=token]').value = token();
  $('#token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    sessionStorage.setItem('iss-token', new FormData(event.target).get('token').trim());
    restart();
    route();
  });
  $('#copy').addEventListener('click', async () => {
    await navigator.clipboard.writeText(state.current.id);
    $('#copy').textContent = 'Copied';
    setTimeout(() => ($('#copy').textContent = 'Copy id'), 1500);
  });
  $('#delete').addEventListener('click', deleteCurrent);
  $('#detail .close').addEventListener('click', leaveDetail);
  $('#detail').addEventListener('cancel', (event) => {
    event.preventDefault();
    leaveDetail();
  });
  window.addEventListener('hashchange', route);
  wireDrop();
  new IntersectionObserver((entries) => entries.some((entry) => entry.isIntersecting) && loadMore(), {
    rootMargin: '400px',
  }).observe($('#more'));
  applyFilters();
  route();
}

start();
