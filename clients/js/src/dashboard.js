// The node's dashboard (`/` of `treescale node --web`): the tree as a
// picture, and each node's rates, subscriptions and durable backlogs. It is
// a page of the JavaScript client: every figure comes from status and tree
// questions asked through one session with the node that served it.

import { connect } from './treescale.js';

const POLL_MS = 2000;
const SVG = 'http://www.w3.org/2000/svg';

const $ = (id) => document.getElementById(id);
// Nodes, by id: the counters seen last, to turn totals into rates.
const previous = new Map();

function tokenFromPage() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get('token');
  if (token) {
    sessionStorage.setItem('treescale-token', token);
    // Out of the address bar, so a shared screen or link does not show it.
    history.replaceState(null, '', location.pathname);
    return token;
  }
  return sessionStorage.getItem('treescale-token');
}

function askForToken() {
  $('ask-token').hidden = false;
  return new Promise((resolve) => {
    $('ask-token').addEventListener('submit', (e) => {
      e.preventDefault();
      const token = $('token').value.trim();
      sessionStorage.setItem('treescale-token', token);
      $('ask-token').hidden = true;
      resolve(token);
    });
  });
}

function showState(text, failed = false) {
  $('state').textContent = text;
  $('state').className = failed ? 'failed' : '';
}

const short = (id) => id.slice(0, 10);

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

/** Places each node: leaves side by side, a parent above the middle of its children. */
function layout(entries) {
  const children = new Map(entries.map((e) => [e.id, []]));
  for (const entry of entries.slice(1)) children.get(entry.parent)?.push(entry.id);
  const place = new Map();
  let nextLeaf = 0;
  const visit = (id, depth) => {
    const below = children.get(id) ?? [];
    below.forEach((child) => visit(child, depth + 1));
    const x = below.length ? (place.get(below[0]).x + place.get(below.at(-1)).x) / 2 : nextLeaf++;
    place.set(id, { x, depth });
  };
  visit(entries[0].id, 0);
  return { place, leaves: Math.max(nextLeaf, 1) };
}

function drawTree(entries) {
  const svg = $('tree');
  const { place, leaves } = layout(entries);
  const depth = Math.max(...[...place.values()].map((p) => p.depth));
  const [dx, dy] = [120, 80];
  svg.setAttribute('viewBox', `0 0 ${leaves * dx} ${(depth + 1) * dy + 10}`);
  svg.style.height = `${(depth + 1) * dy + 10}px`;
  const at = (id) => ({ x: place.get(id).x * dx + dx / 2, y: place.get(id).depth * dy + 25 });
  const drawn = [];
  for (const entry of entries.slice(1)) {
    if (!place.has(entry.parent)) continue;
    const [from, to] = [at(entry.parent), at(entry.id)];
    drawn.push(svgElement('line', { x1: from.x, y1: from.y, x2: to.x, y2: to.y }));
    if (entry.rtt_us > 0) {
      const rtt = entry.rtt_us >= 1000 ? `${(entry.rtt_us / 1000).toFixed(1)} ms` : `${entry.rtt_us} µs`;
      drawn.push(svgElement('text', { class: 'rtt', x: (from.x + to.x) / 2 + 4, y: (from.y + to.y) / 2 }, rtt));
    }
  }
  entries.forEach((entry, i) => {
    if (!place.has(entry.id)) return;
    const { x, y } = at(entry.id);
    const group = svgElement('g', { 'data-node': entry.id, class: i === 0 ? 'root' : '' });
    group.append(svgElement('title', {}, `${entry.name} ${entry.id}`));
    group.append(svgElement('circle', { cx: x, cy: y, r: 9 }));
    group.append(svgElement('text', { x, y: y + 24 }, entry.name));
    drawn.push(group);
  });
  svg.replaceChildren(...drawn);
}

function rate(id, status, now) {
  const before = previous.get(id);
  previous.set(id, { counters: status.counters, at: now });
  if (!before) return () => '…';
  const seconds = (now - before.at) / 1000;
  return (name) => Math.max(0, (status.counters[name] - before.counters[name]) / seconds).toFixed(0);
}

function drawTable(entries, statuses, now) {
  const rows = entries.map((entry, i) => {
    const status = statuses[i];
    const row = document.createElement('tr');
    const cells = [`${entry.name} (${short(entry.id)})`];
    if (status) {
      const per = rate(entry.id, status, now);
      const backlog = status.durables
        .filter((d) => d.held !== null)
        .map((d) => `${d.name}: ${d.held}`)
        .join(', ');
      cells.push(
        status.depth,
        status.clients,
        per('events_published'),
        per('events_delivered'),
        per('events_forwarded'),
        status.counters.events_dropped,
        // This node's own clients' subscriptions, not the interest it routes.
        status.subscriptions
          .filter((s) => s.local > 0)
          .map((s) => `${s.pattern}${s.group ? ` (${s.group})` : ''} ×${s.local}`)
          .join(', '),
        backlog,
      );
    } else {
      cells.push('no answer');
    }
    cells.forEach((value, column) => {
      const cell = document.createElement('td');
      cell.textContent = String(value);
      if (column === 0 || column >= 7 || !status) cell.className = 'text';
      row.append(cell);
    });
    return row;
  });
  $('nodes').querySelector('tbody').replaceChildren(...rows);
  $('nodes').hidden = false;
}

async function poll(client) {
  const here = await client.status();
  const entries = await client.tree({ node: here.root === here.id ? null : here.root });
  const statuses = await Promise.all(
    entries.map((entry) => client.status({ node: entry.id === here.id ? null : entry.id }).catch(() => null)),
  );
  const now = performance.now();
  $('cluster').textContent = `cluster ${here.cluster}`;
  const depth = Math.max(0, ...statuses.filter(Boolean).map((s) => s.depth));
  $('summary').textContent = `${entries.length} node${entries.length === 1 ? '' : 's'}, depth ${depth}`;
  $('tree').dataset.nodes = String(entries.length);
  drawTree(entries);
  drawTable(entries, statuses, now);
  for (const id of previous.keys()) if (!entries.some((e) => e.id === id)) previous.delete(id);
}

async function run() {
  // Without a token, an --insecure node lets the page in; another refuses
  // it, and the page asks for one.
  let token = tokenFromPage();
  for (;;) {
    let client;
    try {
      client = await connect({ token, name: 'dashboard' });
    } catch (e) {
      showState(`not connected: ${e.message}`, true);
      if (e.code === 'TOKEN_REFUSED') token = await askForToken();
      else await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      continue;
    }
    const who = client.user ?? 'nobody in particular (an --insecure node)';
    const connected = `through ${client.node.name} (${short(client.node.id)}), as ${who}`;
    showState(connected);
    let ended = null;
    client.closed.then((why) => (ended = why));
    while (!ended) {
      try {
        await poll(client);
        showState(connected);
      } catch (e) {
        // A question can fail while the tree changes (its root died, say):
        // the next round asks again.
        if (!ended) showState(`${e.message}; asking again`, true);
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    showState(`lost: ${ended.message}; connecting again`, true);
  }
}

run();
