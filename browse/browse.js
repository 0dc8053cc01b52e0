// The browse page: a gallery of the store from its listings, a detail view, uploads and deletes.
// Plain ES module, no build step, nothing from another host; every request goes to this server.

const PAGE = 100; // a first screen of a large display holds about this many tiles
const TILE = 256; // CSS pixels of a thumbnail; srcset asks 1x and 2x of it
const $ = (selector) => document.querySelector(selector);
const state = { next: null, loading: false, seen: new Set(), filters: {}, collection: 'images', current: null };

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

// -- the gallery --------------------------------------------------------------------------
function query() {
  const params = new URLSearchParams({ limit: String(PAGE) });
  for (const [name, value] of Object.entries(state.filters)) if (value) params.set(name, value);
  return `/${state.collection}?${params}`;
}

async function loadMore() {
  if (state.loading || state.next === undefined) return;
  state.loading = true;
  try {
    const page = await (await api(state.next || query())).json();
    for (const item of page.items) if (!state.seen.has(item.id)) addTile(item);
    state.next = page.next || undefined;
    setStatus(state.seen.size ? '' : 'Nothing stored matches.');
  } catch (error) {
    setStatus(error.message);
    state.next = undefined;
  } finally {
    state.loading = false;
  }
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
  const button = document.createElement('button');
  button.type = 'button';
  const name = item.filename || item.id.slice(7, 19);
  if (state.collection === 'images') {
    const img = document.createElement('img');
    img.alt = `${name}, ${item.width}×${item.height} ${item.format || ''}`.trim();
    img.loading = 'lazy';
    img.decoding = 'async';
    img.width = img.height = TILE;
    if (token()) show(img, thumbnail(item, TILE * (window.devicePixelRatio > 1 ? 2 : 1)));
    else {
      img.srcset = `${thumbnail(item, TILE)} 1x, ${thumbnail(item, TILE * 2)} 2x`;
      img.src = thumbnail(item, TILE);
    }
    button.append(img);
    button.setAttribute('aria-label', `Open ${name}`);
  } else {
    button.classList.add('artifact');
    const title = document.createElement('strong');
    title.textContent = item.kind;
    const details = document.createElement('span');
    details.textContent = `${item.mime || ''} · ${size(item.bytes)}`;
    const label = document.createElement('span');
    label.textContent = name;
    button.append(title, label, details);
    button.setAttribute('aria-label', `Open ${item.kind} ${name}`);
  }
  button.addEventListener('click', () => openDetail(item.id, state.collection));
  tile.append(button);
  $('#gallery').append(tile);
}

function size(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

function setStatus(text) {
  $('#status').textContent = text;
}

function restart() {
  state.next = null;
  state.seen.clear();
  $('#gallery').replaceChildren();
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

// -- one blob ------------------------------------------------------------------------------
async function openDetail(id, collection) {
  const dialog = $('#detail');
  state.current = { id, collection };
  const meta = await (await api(`/${collection}/${id}/meta`)).json();
  $('#detail-title').textContent = meta.filename || id;
  $('#detail-id').textContent = id;
  const figure = $('#detail-figure');
  figure.replaceChildren();
  const formats = $('#formats');
  formats.replaceChildren();
  if (collection === 'images') {
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
  const rows = Object.entries({ id, ...meta }).map(([key, value]) => {
    const row = document.createElement('tr');
    const name = document.createElement('th');
    name.scope = 'row';
    name.textContent = key;
    const cell = document.createElement('td');
    cell.textContent = typeof value === 'object' && value !== null ? JSON.stringify(value) : String(value);
    row.append(name, cell);
    return row;
  });
  $('#meta tbody').replaceChildren(...rows);
  if (!dialog.open) dialog.showModal();
}

async function deleteCurrent() {
  const { id, collection } = state.current;
  if (!confirm(`Delete ${id}? Its bytes, meta and derivatives go, for every door.`)) return;
  try {
    await api(`/${collection}/${id}`, { method: 'DELETE' });
    document.querySelector(`#gallery li[data-id="${id}"]`)?.remove();
    state.seen.delete(id);
    $('#detail').close();
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

  const form = new FormData();
  form.append('file', file, file.name);
  const path = kind ? `/artifacts?kind=${encodeURIComponent(kind)}` : '/images';
  return new Promise((resolve) => {
    const request = new XMLHttpRequest();
    request.open('POST', path);
    for (const [header, value] of Object.entries(authorized())) request.setRequestHeader(header, value);
    request.upload.addEventListener('progress', (event) => {
      bar.value = event.loaded;
      outcome.textContent = `${Math.round((100 * event.loaded) / (event.total || 1))}%`;
    });
    request.addEventListener('load', () => {
      let body = {};
      try {
        body = JSON.parse(request.responseText);
      } catch {}
      bar.value = bar.max;
      if (request.status === 201 || request.status === 200) {
        const id = body.image_id || body.artifact_id;
        outcome.className = `outcome ${request.status === 201 ? 'new' : 'stored'}`;
        outcome.textContent = `${request.status === 201 ? 'new' : 'already stored'}: ${id}`;
      } else {
        outcome.className = 'outcome error';
        outcome.textContent = `${request.status} ${body.title || request.statusText}: ${body.description || ''}`;
      }
      resolve(request.status);
    });
    request.addEventListener('error', () => {
      outcome.className = 'outcome error';
      outcome.textContent = 'the connection failed';
      resolve(0);
    });
    request.send(form);
  });
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
  });
  $('#copy').addEventListener('click', async () => {
    await navigator.clipboard.writeText(state.current.id);
    $('#copy').textContent = 'Copied';
    setTimeout(() => ($('#copy').textContent = 'Copy id'), 1500);
  });
  $('#delete').addEventListener('click', deleteCurrent);
  wireDrop();
  new IntersectionObserver((entries) => entries.some((entry) => entry.isIntersecting) && loadMore(), {
    rootMargin: '400px',
  }).observe($('#more'));
  applyFilters();
}

start();
