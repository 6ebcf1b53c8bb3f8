// The JavaScript codec against the golden vectors the Rust tests write
// (tests/js_vectors.rs): every message decodes to the value Rust gives it
// and encodes back to the same bytes.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { DecodeError, FrameSplitter, decodeMessage, encodeFrame, encodeMessage } from '../src/codec.js';
import * as messages from '../src/messages.js';
import { matches } from '../src/treescale.js';

const vectors = JSON.parse(readFileSync(new URL('./vectors.json', import.meta.url)));

const fromHex = (hex) => Uint8Array.from(hex.match(/../g) ?? [], (b) => parseInt(b, 16));
const toHex = (bytes) => Buffer.from(bytes).toString('hex');

/** The decoded value as serde_json writes the Rust one. */
function asJson(value) {
  if (value instanceof Uint8Array) return Array.from(value);
  if (typeof value === 'bigint') return value > BigInt(Number.MAX_SAFE_INTEGER) ? value.toString() : Number(value);
  if (Array.isArray(value)) return value.map(asJson);
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, asJson(v)]));
  }
  return value;
}

test('the constants are those of the Rust side', () => {
  assert.equal(messages.PROTOCOL_VERSION, vectors.protocolVersion);
  assert.equal(messages.DEFAULT_MAX_FRAME, vectors.maxFrame);
  assert.equal(messages.MAX_PAYLOAD, vectors.maxPayload);
  assert.deepEqual(messages.ERROR_CODES, vectors.errorCodes);
});

test('every variant of every client message type has a vector', () => {
  for (const type of ['ClientRequest', 'ClientReply', 'PublishFrame', 'PublishReply', 'Delivery']) {
    const seen = new Set(vectors.messages.filter((v) => v.type === type).map((v) => Object.keys(v.value)[0]));
    assert.deepEqual([...seen].sort(), [...messages[type].variants].sort(), type);
  }
});

for (const [i, vector] of vectors.messages.entries()) {
  const name = typeof vector.value === 'string' ? vector.value : Object.keys(vector.value)[0];
  test(`vector ${i}: ${vector.type}::${name} decodes to Rust's value and encodes to its bytes`, () => {
    const type = messages[vector.type];
    const decoded = decodeMessage(type, fromHex(vector.hex));
    assert.deepEqual(asJson(decoded), vector.value);
    assert.equal(toHex(encodeMessage(type, decoded)), vector.hex);
  });
}

test('a body with bytes left over, a truncated body and an unknown kind are refused', () => {
  const hello = fromHex(vectors.messages[0].hex);
  const refused = (bytes, why) =>
    assert.throws(() => decodeMessage(messages.ClientRequest, bytes), DecodeError, why);
  refused(Uint8Array.from([...hello, 0]), 'left over');
  refused(hello.subarray(0, hello.length - 1), 'truncated');
  refused(Uint8Array.from([42]), 'unknown kind');
  refused(Uint8Array.from([0, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]), 'a varint over 32 bits');
  refused(Uint8Array.from([0, 6, 2, 0xc3, 0x28]), 'not UTF-8');
  refused(Uint8Array.from([1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]), 'a length past the body');
});

test('frames come out the same however the stream is cut', () => {
  const sent = vectors.messages.filter((v) => v.type === 'PublishFrame');
  const w = sent.reduce((w, v) => encodeFrame(messages.PublishFrame, decodeMessage(messages.PublishFrame, fromHex(v.hex)), w), undefined);
  const stream = w.finish();
  for (const cut of [1, 2, 3, 5, 7, 64, stream.length]) {
    const frames = new FrameSplitter(messages.DEFAULT_MAX_FRAME);
    const bodies = [];
    for (let at = 0; at < stream.length; at += cut) {
      frames.push(stream.slice(at, at + cut));
      for (let body = frames.next(); body; body = frames.next()) bodies.push(toHex(body));
    }
    assert.equal(frames.pending, 0);
    assert.deepEqual(bodies, sent.map((v) => v.hex), `cut every ${cut} bytes`);
  }
});

test('a frame header over the limit is refused before its body comes', () => {
  const frames = new FrameSplitter(16);
  frames.push(Uint8Array.from([17, 0, 0, 0]));
  assert.throws(() => frames.next(), /over the limit of 16/);
});

test('the example frame of docs/protocol.md', () => {
  const frame = encodeFrame(messages.ClientRequest, { Hello: { version: 8, name: 'cli' } }).finish();
  assert.equal(toHex(frame), '06000000' + '00' + '08' + '03636c69');
});

test('patterns match topics as the node matches them', () => {
  assert.ok(matches('orders.eu', 'orders.eu'));
  assert.ok(!matches('orders.eu', 'orders.eu.paris'));
  assert.ok(matches('orders.*', 'orders.eu'));
  assert.ok(!matches('orders.*', 'orders'));
  assert.ok(!matches('orders.*', 'orders.eu.paris'));
  assert.ok(matches('orders.>', 'orders.eu.paris'));
  assert.ok(!matches('orders.>', 'orders'));
  assert.ok(matches('>', 'anything.at.all'));
  assert.ok(matches('*.eu', 'orders.eu'));
});
