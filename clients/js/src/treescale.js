// The TreeScale client for browsers: the client protocol of
// docs/protocol.md over a WebTransport session. No dependencies; the node
// serves this module at /treescale.js (`treescale node --web ADDR`).
//
//   import { connect } from '/treescale.js';
//   const client = await connect({ token });
//   for await (const event of await client.subscribe('orders.>')) console.log(event.text());

import { DecodeError, FrameSplitter, Writer, decodeMessage, encodeFrame } from './codec.js';
import {
  ClientReply,
  ClientRequest,
  DEFAULT_MAX_FRAME,
  Delivery,
  ERROR_CODES,
  MAX_PAYLOAD,
  PROTOCOL_VERSION,
  PublishFrame,
  PublishReply,
} from './messages.js';

export { PROTOCOL_VERSION, MAX_PAYLOAD, ERROR_CODES };

/**
 * Every failure the client reports. `code` names it: a `RequestError` of
 * the node (`PermissionDenied`, `InvalidPattern`, …), a session's close
 * code (`TOKEN_REFUSED`, `SLOW_CONSUMER`, …), or one of the client's own:
 * `Closed`, `Timeout`, `NoResponders`, `PayloadTooLarge`, `Connect`.
 */
export class TreeScaleError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'TreeScaleError';
    this.code = code;
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Bytes of a payload given as a string (UTF-8) or bytes. */
function payloadBytes(data) {
  const bytes = typeof data === 'string' ? encoder.encode(data) : new Uint8Array(data);
  if (bytes.length > MAX_PAYLOAD) {
    throw new TreeScaleError(
      'PayloadTooLarge',
      `payload of ${bytes.length} bytes is over the ${MAX_PAYLOAD} bytes an event may carry`,
    );
  }
  return bytes;
}

/** Whether `pattern` (with `*` and a final `>`) matches `topic`. */
export function matches(pattern, topic) {
  const want = pattern.split('.');
  const have = topic.split('.');
  for (let i = 0; i < want.length; i++) {
    if (want[i] === '>') return have.length > i;
    if (i >= have.length || (want[i] !== '*' && want[i] !== have[i])) return false;
  }
  return have.length === want.length;
}

/** An event received by a subscription. */
export class Event {
  constructor(client, event, reply = null) {
    this.topic = event.topic;
    this.payload = event.payload;
    /** `[name, value]` pairs, as published. */
    this.headers = event.headers;
    /** `{ publisher: BigInt, seq: Number }`: unique across the overlay. */
    this.id = event.id;
    /** The node where the event entered the overlay. */
    this.origin = event.origin;
    this._client = client;
    this._reply = reply;
  }

  /** The payload as UTF-8 text. */
  text() {
    return decoder.decode(this.payload);
  }

  /** Whether this is a request, to answer with `respond`. */
  get isRequest() {
    return this._reply !== null;
  }

  /** Answers this request; the answer goes straight back to the requester. */
  respond(data, { headers = [] } = {}) {
    if (!this._reply) throw new TreeScaleError('NotARequest', 'this event is not a request');
    const event = this._client._published(this.topic, data, headers);
    return this._client._publishFrame({ Reply: { event, to: this._reply } });
  }
}

/**
 * A subscription: an async iterator of events. Events wait here until
 * read, up to `bound`; past it the client stops reading deliveries, and
 * the node closes a session that stays that slow (SLOW_CONSUMER).
 */
export class Subscription {
  constructor(client, sub, pattern, group, bound) {
    this.client = client;
    this.sub = sub;
    this.pattern = pattern;
    this.group = group;
    this._bound = bound;
    // A queue: read from `_head` on (shift() copies the whole array).
    this._events = [];
    this._head = 0;
    this._waiting = null;
    this._roomWaiters = [];
    this._end = null;
  }

  _push(event) {
    if (this._waiting) {
      const waiting = this._waiting;
      this._waiting = null;
      waiting.resolve({ value: event, done: false });
      return null;
    }
    this._events.push(event);
    if (this._queued() < this._bound) return null;
    return new Promise((resolve) => this._roomWaiters.push(resolve));
  }

  _finish(error) {
    if (this._end) return;
    this._end = { error };
    if (this._waiting) {
      const waiting = this._waiting;
      this._waiting = null;
      if (error) waiting.reject(error);
      else waiting.resolve({ value: undefined, done: true });
    }
    this._roomWaiters.splice(0).forEach((resolve) => resolve());
  }

  _queued() {
    return this._events.length - this._head;
  }

  /** The next event; `done` once unsubscribed, rejected when the session failed. */
  next() {
    if (this._queued() > 0) {
      const event = this._events[this._head];
      this._events[this._head++] = undefined;
      if (this._head >= 1024 && this._head * 2 >= this._events.length) {
        this._events = this._events.slice(this._head);
        this._head = 0;
      }
      if (this._queued() < this._bound) this._roomWaiters.splice(0).forEach((resolve) => resolve());
      return Promise.resolve({ value: event, done: false });
    }
    if (this._end) {
      return this._end.error ? Promise.reject(this._end.error) : Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      this._waiting = { resolve, reject };
    });
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  /** Leaving a `for await` loop early unsubscribes. */
  async return() {
    await this.unsubscribe();
    return { value: undefined, done: true };
  }

  /** Stops the subscription; events already received can still be read. */
  async unsubscribe() {
    if (this._end) return;
    this._finish(null);
    if (!this.client._closed) await this.client._call(this.sub, { Unsubscribe: { sub: this.sub } });
    this.client._subscriptions.delete(this.sub);
  }
}

/** Writes frames of one type, coalescing those sent together into one write. */
class FrameWriter {
  constructor(writable, type) {
    this.writer = writable.getWriter();
    this.type = type;
    this.batch = null;
    this.written = null;
  }

  send(value) {
    if (!this.batch) {
      this.batch = new Writer(1024);
      this.written = Promise.resolve().then(() => {
        const chunk = this.batch.finish();
        this.batch = null;
        return this.writer.write(chunk);
      });
    }
    encodeFrame(this.type, value, this.batch);
    return this.written;
  }
}

/**
 * Reads the frames of one stream, of one type, until it ends: the messages
 * of each chunk received together, as one array (a promise per message
 * cost half the throughput).
 */
async function* readFrames(readable, type, maxFrame) {
  const reader = readable.getReader();
  const frames = new FrameSplitter(maxFrame);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        if (frames.pending > 0) throw new DecodeError('the stream ended inside a frame');
        return;
      }
      frames.push(value);
      const messages = [];
      for (let body = frames.next(); body; body = frames.next()) messages.push(decodeMessage(type, body));
      if (messages.length > 0) yield messages;
    }
  } finally {
    reader.releaseLock();
  }
}

function hexOrBase64(hash) {
  if (hash instanceof Uint8Array) return hash;
  if (/^[0-9a-fA-F]{64}$/.test(hash)) {
    return Uint8Array.from(hash.match(/../g), (b) => parseInt(b, 16));
  }
  return Uint8Array.from(atob(hash), (c) => c.charCodeAt(0));
}

/**
 * Opens a session with a node and says hello.
 *
 * Without `url`, asks `/webtransport.json` beside this module (the node's
 * `--web` side) for the URL and certificate hash.
 *
 * @param {object} options
 * @param {string} [options.url] the node's WebTransport URL, `https://host:port/`
 * @param {string|Uint8Array|null} [options.certHash] SHA-256 of the node's web
 *   certificate (hex or base64), for a node without a publicly trusted one
 * @param {string} [options.token] from `treescale certs issue token`; needed
 *   unless the node runs --insecure
 * @param {string} [options.name] shown in the node's logs and status
 * @param {number} [options.subscriptionBound] events a subscription holds unread
 * @returns {Promise<Client>}
 */
export async function connect({ url, certHash, token, name = 'browser', subscriptionBound = 10_000 } = {}) {
  if (url === undefined) {
    const where = new URL('webtransport.json', import.meta.url);
    const response = await fetch(where, { cache: 'no-store' });
    if (!response.ok) throw new TreeScaleError('Connect', `${where}: ${response.status} ${response.statusText}`);
    ({ url, certHash } = await response.json());
  }
  const options = certHash ? { serverCertificateHashes: [{ algorithm: 'sha-256', value: hexOrBase64(certHash) }] } : {};
  const session = new WebTransport(url, options);
  try {
    await session.ready;
  } catch (e) {
    throw new TreeScaleError('Connect', `no session with ${url}: ${e.message} (the browser's log says why)`);
  }
  const client = new Client(session, subscriptionBound);
  await client._hello(name, token);
  return client;
}

/** A session with one node. */
export class Client {
  constructor(session, subscriptionBound) {
    this._session = session;
    this._subscriptionBound = subscriptionBound;
    this._number = 0;
    this._calls = new Map();
    this._subscriptions = new Map();
    this._requests = new Map();
    this._flushes = new Map();
    this._publisher = crypto.getRandomValues(new BigUint64Array(1))[0];
    this._seq = 0;
    this._closed = null;
    session.closed.then(
      (info) => this._fail(closedError(info)),
      (e) => this._fail(new TreeScaleError('Closed', `the session failed: ${e.message}`)),
    );
  }

  async _hello(name, token) {
    const control = await this._session.createBidirectionalStream();
    this._control = new FrameWriter(control.writable, ClientRequest);
    const welcome = new Promise((resolve, reject) => this._calls.set('hello', { resolve, reject }));
    // Without a token only an --insecure node lets a browser in.
    const hello = token ? { HelloWithToken: { version: PROTOCOL_VERSION, name, token } } : { Hello: { version: PROTOCOL_VERSION, name } };
    this._control.send(hello);
    this._pump(readFrames(control.readable, ClientReply, DEFAULT_MAX_FRAME), (reply) => this._onReply(reply));
    const { Welcome } = await welcome;
    /** The node's id (64 hex digits), name and cluster. */
    this.node = { id: Welcome.node, name: Welcome.name, cluster: Welcome.cluster };
    /** The token's user. */
    this.user = Welcome.user;
    /** What this client may publish to and subscribe to. */
    this.grant = Welcome.grant;
    const publish = await this._session.createBidirectionalStream();
    this._publish = new FrameWriter(publish.writable, PublishFrame);
    this._pump(readFrames(publish.readable, PublishReply, DEFAULT_MAX_FRAME), (reply) => this._onPublishReply(reply));
    this._acceptDeliveries();
  }

  async _pump(batches, handle) {
    try {
      for await (const batch of batches) {
        for (const message of batch) {
          // A promise only when a subscription is full: wait for room.
          const full = handle(message);
          if (full) await full;
        }
      }
    } catch (e) {
      if (this._closed) return;
      const malformed = e instanceof DecodeError;
      this._fail(new TreeScaleError(malformed ? 'MALFORMED_FRAME' : 'Closed', e.message));
      this._session.close({ closeCode: malformed ? 1 : 0, reason: e.message });
    }
  }

  async _acceptDeliveries() {
    const streams = this._session.incomingUnidirectionalStreams.getReader();
    for (;;) {
      let next;
      try {
        next = await streams.read();
      } catch {
        return; // the session closed: _fail reports it
      }
      if (next.done) return;
      this._pump(readFrames(next.value, Delivery, DEFAULT_MAX_FRAME), (delivery) => this._onDelivery(delivery));
    }
  }

  _onReply(reply) {
    if (reply.Welcome) return this._settle('hello', reply);
    if (reply.Error) {
      const { request, error, message } = reply.Error;
      return this._settle(request, null, new TreeScaleError(error, message));
    }
    const [body] = Object.values(reply);
    this._settle(body.sub ?? body.request, reply);
  }

  _settle(number, reply, error) {
    const call = this._calls.get(number);
    if (!call) return;
    this._calls.delete(number);
    if (error) call.reject(error);
    else call.resolve(reply);
  }

  _onPublishReply(reply) {
    if (reply.Flushed !== undefined) {
      this._flushes.get(reply.Flushed)?.resolve();
      this._flushes.delete(reply.Flushed);
    } else if (reply.RequestFailed) {
      const { request, reason, message } = reply.RequestFailed;
      this._requests.get(request)?.reject(new TreeScaleError(reason, message));
      this._requests.delete(request);
    }
  }

  _onDelivery(delivery) {
    if (delivery.Reply) {
      const { request, event } = delivery.Reply;
      this._requests.get(request)?.resolve(new Event(this, event));
      this._requests.delete(request);
      return null;
    }
    const { sub, event, reply = null } = delivery.Event ?? delivery.Request ?? {};
    if (sub === undefined) return null; // durable deliveries: this client makes no durable subscriptions
    return this._subscriptions.get(sub)?._push(new Event(this, event, reply)) ?? null;
  }

  _fail(error) {
    if (this._closed) return;
    this._closed = error;
    for (const call of this._calls.values()) call.reject(error);
    for (const waiter of [...this._requests.values(), ...this._flushes.values()]) waiter.reject(error);
    for (const subscription of this._subscriptions.values()) subscription._finish(error.code === 'CLOSED' ? null : error);
    this._calls.clear();
    this._requests.clear();
    this._flushes.clear();
  }

  _next() {
    this._number += 1;
    return this._number;
  }

  _check() {
    if (this._closed) throw this._closed;
  }

  _call(number, request) {
    this._check();
    const answered = new Promise((resolve, reject) => this._calls.set(number, { resolve, reject }));
    this._control.send(request);
    return answered;
  }

  _published(topic, data, headers) {
    const payload = payloadBytes(data);
    this._seq += 1;
    return { id: { publisher: this._publisher, seq: this._seq }, topic, headers, payload };
  }

  _publishFrame(frame) {
    this._check();
    return this._publish.send(frame);
  }

  _checkPublish(topic) {
    if (!this.grant.publish.some((pattern) => matches(pattern, topic))) {
      throw new TreeScaleError('PermissionDenied', `${this.user} may not publish to ${topic}`);
    }
  }

  /**
   * Publishes an event to every subscriber of `topic` (one member of each
   * queue group). `data` is a string (sent as UTF-8) or bytes. Resolves
   * once the event is handed to the session; `flush` says when the node
   * has routed it.
   */
  publish(topic, data, { headers = [] } = {}) {
    this._checkPublish(topic);
    return this._publishFrame({ Event: this._published(topic, data, headers) });
  }

  /** Resolves once the node has routed every event published before. */
  flush() {
    this._check();
    const token = this._next();
    const flushed = new Promise((resolve, reject) => this._flushes.set(token, { resolve, reject }));
    this._publishFrame({ Flush: token });
    return flushed;
  }

  /**
   * Subscribes to `pattern` (`*` is one token, a final `>` one or more);
   * with `group`, each event goes to one member of the queue group.
   * Resolves once the node has the subscription.
   * @returns {Promise<Subscription>}
   */
  async subscribe(pattern, { group = null } = {}) {
    const sub = this._next();
    const subscription = new Subscription(this, sub, pattern, group, this._subscriptionBound);
    this._subscriptions.set(sub, subscription);
    try {
      await this._call(sub, { Subscribe: { sub, pattern, group } });
    } catch (e) {
      this._subscriptions.delete(sub);
      throw e;
    }
    return subscription;
  }

  /**
   * Sends a request to `topic` and resolves with the first answer (an
   * Event). Rejects with `NoResponders` at once when nothing anywhere
   * subscribes to it, and with `Timeout` after `timeoutMs`.
   */
  request(topic, data, { headers = [], timeoutMs = 5000 } = {}) {
    this._checkPublish(topic);
    const request = this._next();
    const answered = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._requests.delete(request);
        reject(new TreeScaleError('Timeout', `no answer to ${topic} within ${timeoutMs} ms`));
      }, timeoutMs);
      const done = (settle) => (value) => {
        clearTimeout(timer);
        settle(value);
      };
      this._requests.set(request, { resolve: done(resolve), reject: done(reject) });
    });
    this._publishFrame({ Request: { event: this._published(topic, data, headers), request } });
    return answered;
  }

  /**
   * Resolves `true` once a subscription anywhere in the overlay matches
   * `topic`, `false` if none appeared within `timeoutMs`: events published
   * before then would reach no one.
   */
  async waitForInterest(topic, { timeoutMs = 5000 } = {}) {
    const request = this._next();
    const waited = { request, topic, timeout_ms: timeoutMs };
    return (await this._call(request, { WaitInterest: waited })).Interest.present;
  }

  /**
   * A node's view of itself: its peers, its place in the tree,
   * subscriptions, counters. Without `node`, this client's node; with a
   * node id (64 hex digits), any node of the tree, asked through this one.
   * @returns {Promise<object>} NodeStatus (docs/protocol.md)
   */
  async status({ node = null, timeoutMs = 5000 } = {}) {
    return (await this._question('Status', node, timeoutMs)).Status.status;
  }

  /**
   * A node's subtree, the node first: asked of the root, the whole tree.
   * Without `node`, this client's node; with a node id, any node of the tree.
   * @returns {Promise<object[]>} DirectoryEntry objects
   */
  async tree({ node = null, timeoutMs = 5000 } = {}) {
    return (await this._question('Tree', node, timeoutMs)).Tree.nodes;
  }

  _question(question, node, timeoutMs) {
    const request = this._next();
    if (node === null) return this._call(request, { [question]: { request } });
    const answered = this._call(request, { Ask: { request, node, question } });
    // A question lost with a link on the way gets no answer.
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => {
        this._calls.delete(request);
        reject(new TreeScaleError('Timeout', `node ${node.slice(0, 10)} did not answer within ${timeoutMs} ms`));
      }, timeoutMs);
    });
    return Promise.race([answered, late]).finally(() => clearTimeout(timer));
  }

  /** Resolves with the error that ended the session; `CLOSED` after `close`. */
  get closed() {
    return this._session.closed.then(closedError, (e) => new TreeScaleError('Closed', e.message));
  }

  /** Flushes what was published, then closes the session. */
  async close() {
    if (!this._closed) {
      await this.flush().catch(() => {});
      this._session.close({ closeCode: 0, reason: 'closed' });
    }
    await this._session.closed.catch(() => {});
  }
}

function closedError(info = {}) {
  const code = ERROR_CODES[info.closeCode ?? 0] ?? `code ${info.closeCode}`;
  return new TreeScaleError(code, info.reason || code.toLowerCase().replaceAll('_', ' '));
}
