// The wire format of docs/protocol.md: postcard messages in length-prefixed
// frames. Values mirror serde_json's shape of the Rust types (externally
// tagged enums, snake_case fields), except that a NodeId is 64 hex digits,
// bytes are a Uint8Array, and the two random 64-bit numbers (a publisher
// and an inbox) are BigInts; every other u64 is a Number.

/** Raised on bytes that do not decode; the client closes the session with MALFORMED_FRAME. */
export class DecodeError extends Error {
  constructor(message) {
    super(message);
    this.name = 'DecodeError';
  }
}

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder('utf-8', { fatal: true });

/** A growable byte buffer that types append their encoding to. */
export class Writer {
  constructor(capacity = 256) {
    this.bytes = new Uint8Array(capacity);
    this.length = 0;
  }

  reserve(n) {
    if (this.length + n <= this.bytes.length) return;
    let capacity = this.bytes.length * 2;
    while (capacity < this.length + n) capacity *= 2;
    const grown = new Uint8Array(capacity);
    grown.set(this.bytes.subarray(0, this.length));
    this.bytes = grown;
  }

  byte(b) {
    this.reserve(1);
    this.bytes[this.length++] = b;
  }

  raw(bytes) {
    this.reserve(bytes.length);
    this.bytes.set(bytes, this.length);
    this.length += bytes.length;
  }

  /** An unsigned LEB128 varint of a Number (up to 2^53) or a BigInt. */
  varint(value) {
    if (typeof value === 'bigint') {
      let rest = value;
      while (rest >= 0x80n) {
        this.byte(Number(rest & 0x7fn) | 0x80);
        rest >>= 7n;
      }
      this.byte(Number(rest));
      return;
    }
    let rest = value;
    while (rest >= 0x80) {
      this.byte((rest % 0x80) | 0x80);
      rest = Math.floor(rest / 0x80);
    }
    this.byte(rest);
  }

  finish() {
    return this.bytes.subarray(0, this.length);
  }
}

/** Reads values back from one message body. */
export class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.offset = 0;
  }

  byte() {
    if (this.offset >= this.bytes.length) throw new DecodeError('the message ends early');
    return this.bytes[this.offset++];
  }

  raw(n) {
    if (this.offset + n > this.bytes.length) throw new DecodeError('the message ends early');
    const slice = this.bytes.slice(this.offset, this.offset + n);
    this.offset += n;
    return slice;
  }

  /** A varint of at most `bits` bits, as a BigInt. */
  varintBig(bits) {
    let value = 0n;
    for (let shift = 0n; shift < BigInt(bits) + 7n; shift += 7n) {
      const b = this.byte();
      value |= BigInt(b & 0x7f) << shift;
      if ((b & 0x80) === 0) {
        if (value >> BigInt(bits) !== 0n) throw new DecodeError(`a varint over ${bits} bits`);
        return value;
      }
    }
    throw new DecodeError(`a varint over ${bits} bits`);
  }

  /** A varint of at most `bits` bits, as a Number; refuses one past 2^53. */
  varint(bits) {
    const value = this.varintBig(bits);
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new DecodeError(`${value} is too large for a JavaScript number`);
    }
    return Number(value);
  }

  finish() {
    if (this.offset !== this.bytes.length) {
      throw new DecodeError(`${this.bytes.length - this.offset} bytes left over after the message`);
    }
  }
}

/**
 * A type: how one kind of value is written and read.
 * @typedef {{ encode(w: Writer, value: any): void, decode(r: Reader): any }} Type
 */

const unsigned = (bits, max) => ({
  encode(w, value) {
    if (!Number.isSafeInteger(value) || value < 0 || value > max) {
      throw new RangeError(`${value} is not a u${bits}`);
    }
    w.varint(value);
  },
  decode: (r) => r.varint(bits),
});

export const u8 = {
  encode(w, value) {
    if (!Number.isInteger(value) || value < 0 || value > 0xff) throw new RangeError(`${value} is not a u8`);
    w.byte(value);
  },
  decode: (r) => r.byte(),
};
export const u16 = unsigned(16, 0xffff);
export const u32 = unsigned(32, 0xffffffff);
export const u64 = unsigned(64, Number.MAX_SAFE_INTEGER);

/** A u64 that may use all 64 bits (a random id): a BigInt. */
export const u64big = {
  encode(w, value) {
    const big = BigInt(value);
    if (big < 0n || big >> 64n !== 0n) throw new RangeError(`${value} is not a u64`);
    w.varint(big);
  },
  decode: (r) => r.varintBig(64),
};

export const bool = {
  encode: (w, value) => w.byte(value ? 1 : 0),
  decode(r) {
    const b = r.byte();
    if (b > 1) throw new DecodeError(`${b} is not a bool`);
    return b === 1;
  },
};

export const bytes = {
  encode(w, value) {
    w.varint(value.length);
    w.raw(value);
  },
  decode: (r) => r.raw(r.varint(64)),
};

// Events in a row mostly carry the same topic and origin: the text of the
// last bytes decoded is kept, as decoding showed in profiles.
const lastText = { bytes: new Uint8Array(0), text: '' };

function sameBytes(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

export const string = {
  encode: (w, value) => bytes.encode(w, utf8Encoder.encode(value)),
  decode(r) {
    const raw = bytes.decode(r);
    if (raw.length <= 64 && sameBytes(raw, lastText.bytes)) return lastText.text;
    let text;
    try {
      text = utf8Decoder.decode(raw);
    } catch {
      throw new DecodeError('a string that is not UTF-8');
    }
    if (raw.length <= 64) Object.assign(lastText, { bytes: raw, text });
    return text;
  },
};

const HEX = /^[0-9a-f]{64}$/;

/** A NodeId: 32 bytes on the wire, 64 lowercase hex digits here. */
export const nodeId = {
  encode(w, value) {
    if (!HEX.test(value)) throw new RangeError(`${value} is not a node id (64 hex digits)`);
    const id = new Uint8Array(32);
    for (let i = 0; i < 32; i++) id[i] = parseInt(value.slice(2 * i, 2 * i + 2), 16);
    bytes.encode(w, id);
  },
  decode(r) {
    const id = bytes.decode(r);
    if (id.length !== 32) throw new DecodeError(`a node id of ${id.length} bytes, not 32`);
    if (sameBytes(id, lastId.bytes)) return lastId.hex;
    Object.assign(lastId, { bytes: id, hex: toHex(id) });
    return lastId.hex;
  },
};

const lastId = { bytes: new Uint8Array(0), hex: '' };

export function toHex(data) {
  return Array.from(data, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** An IP socket address, written as Rust writes it: `1.2.3.4:5`, `[::1]:5`. */
export const socketAddr = {
  encode(w, value) {
    const v6 = /^\[(.*)\]:(\d+)$/.exec(value);
    const v4 = /^(\d+)\.(\d+)\.(\d+)\.(\d+):(\d+)$/.exec(value);
    if (v4) {
      w.varint(0);
      for (let i = 1; i <= 4; i++) u8.encode(w, Number(v4[i]));
      u16.encode(w, Number(v4[5]));
    } else if (v6) {
      w.varint(1);
      w.raw(parseIpv6(v6[1]));
      u16.encode(w, Number(v6[2]));
    } else {
      throw new RangeError(`${value} is not a socket address`);
    }
  },
  decode(r) {
    const kind = r.varint(32);
    if (kind === 0) {
      const ip = r.raw(4).join('.');
      return `${ip}:${u16.decode(r)}`;
    }
    if (kind === 1) {
      const ip = formatIpv6(r.raw(16));
      return `[${ip}]:${u16.decode(r)}`;
    }
    throw new DecodeError(`socket address kind ${kind}`);
  },
};

function parseIpv6(text) {
  const [head, tail] = text.includes('::') ? text.split('::') : [text, null];
  // A dotted IPv4 tail (`::ffff:10.0.0.1`) is the last two groups.
  const group = (g) => {
    const v4 = g.split('.').map(Number);
    return v4.length === 4 ? [(v4[0] << 8) | v4[1], (v4[2] << 8) | v4[3]] : [parseInt(g, 16)];
  };
  const groups = (part) => (part ? part.split(':').flatMap(group) : []);
  const front = groups(head);
  const back = tail === null ? [] : groups(tail);
  const zeros = tail === null ? 0 : 8 - front.length - back.length;
  const all = [...front, ...new Array(zeros).fill(0), ...back];
  if (all.length !== 8 || all.some((g) => !(g >= 0 && g <= 0xffff))) {
    throw new RangeError(`${text} is not an IPv6 address`);
  }
  return Uint8Array.from(all.flatMap((g) => [g >> 8, g & 0xff]));
}

// RFC 5952, as Rust's Display for Ipv6Addr: the longest run of two or more
// zero groups becomes `::`, and an IPv4-mapped address ends in dotted form.
function formatIpv6(octets) {
  const groups = [];
  for (let i = 0; i < 16; i += 2) groups.push((octets[i] << 8) | octets[i + 1]);
  if (groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff) {
    return `::ffff:${octets.slice(12).join('.')}`;
  }
  let best = { start: -1, length: 0 };
  for (let i = 0; i < 8; ) {
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > best.length) best = { start: i, length: j - i };
    i = j > i ? j : i + 1;
  }
  const hex = (gs) => gs.map((g) => g.toString(16)).join(':');
  if (best.length < 2) return hex(groups);
  return `${hex(groups.slice(0, best.start))}::${hex(groups.slice(best.start + best.length))}`;
}

/** `null` for none, else the value. */
export const option = (type) => ({
  encode(w, value) {
    if (value === null || value === undefined) {
      w.byte(0);
    } else {
      w.byte(1);
      type.encode(w, value);
    }
  },
  decode(r) {
    const tag = r.byte();
    if (tag === 0) return null;
    if (tag === 1) return type.decode(r);
    throw new DecodeError(`option tag ${tag}`);
  },
});

export const vec = (type) => ({
  encode(w, values) {
    w.varint(values.length);
    for (const value of values) type.encode(w, value);
  },
  decode(r) {
    const count = r.varint(64);
    // Each element takes a byte at least: a count past the bytes left is a lie.
    if (count > r.bytes.length - r.offset) throw new DecodeError(`a sequence of ${count} elements`);
    const values = [];
    for (let i = 0; i < count; i++) values.push(type.decode(r));
    return values;
  },
});

/** A tuple: an array of its fields. */
export const tuple = (...types) => ({
  encode(w, values) {
    types.forEach((type, i) => type.encode(w, values[i]));
  },
  decode: (r) => types.map((type) => type.decode(r)),
});

/** A struct: an object whose keys are its fields, in declaration order. */
export const struct = (fields) => {
  const entries = Object.entries(fields);
  return {
    encode(w, value) {
      for (const [name, type] of entries) {
        if (!(name in value)) throw new TypeError(`field ${name} is missing`);
        type.encode(w, value[name]);
      }
    },
    decode(r) {
      const value = {};
      for (const [name, type] of entries) value[name] = type.decode(r);
      return value;
    },
  };
};

/**
 * An enum, externally tagged as serde_json writes it: a variant without
 * fields is its name, `"Join"`; any other is `{ Name: fields }`. Variants
 * are listed in order, as a name or as `[name, type]`.
 */
export const enumOf = (variants) => {
  const list = variants.map((v) => (typeof v === 'string' ? [v, null] : v));
  const kinds = new Map(list.map(([name], kind) => [name, kind]));
  return {
    variants: list.map(([name]) => name),
    encode(w, value) {
      const name = typeof value === 'string' ? value : Object.keys(value)[0];
      const kind = kinds.get(name);
      if (kind === undefined) throw new TypeError(`no variant ${name}`);
      w.varint(kind);
      const type = list[kind][1];
      if (type) type.encode(w, value[name]);
    },
    decode(r) {
      const kind = r.varint(32);
      if (kind >= list.length) throw new DecodeError(`unknown message kind ${kind}`);
      const [name, type] = list[kind];
      return type ? { [name]: type.decode(r) } : name;
    },
  };
};

/** One message as a frame body. */
export function encodeMessage(type, value) {
  const w = new Writer();
  type.encode(w, value);
  return w.finish();
}

/** A whole frame body as one message; leftover bytes are an error. */
export function decodeMessage(type, body) {
  const r = new Reader(body);
  const value = type.decode(r);
  r.finish();
  return value;
}

/** One message as a frame: a u32 little-endian length, then the body. */
export function encodeFrame(type, value, w = new Writer()) {
  const start = w.length;
  w.reserve(4);
  w.length += 4;
  type.encode(w, value);
  const length = w.length - start - 4;
  new DataView(w.bytes.buffer, w.bytes.byteOffset).setUint32(start, length, true);
  return w;
}

/**
 * Splits a byte stream into frame bodies, however the stream is cut. Feed
 * it chunks with `push`; `next` gives the next whole body or `null`.
 */
export class FrameSplitter {
  constructor(maxFrame) {
    this.maxFrame = maxFrame;
    this.buffer = new Uint8Array(0);
    this.offset = 0;
  }

  push(chunk) {
    const left = this.buffer.length - this.offset;
    if (left === 0) {
      this.buffer = chunk;
    } else {
      const joined = new Uint8Array(left + chunk.length);
      joined.set(this.buffer.subarray(this.offset));
      joined.set(chunk, left);
      this.buffer = joined;
    }
    this.offset = 0;
  }

  /** Bytes received that are not yet a whole frame. */
  get pending() {
    return this.buffer.length - this.offset;
  }

  next() {
    if (this.pending < 4) return null;
    const view = new DataView(this.buffer.buffer, this.buffer.byteOffset + this.offset, 4);
    const length = view.getUint32(0, true);
    if (length > this.maxFrame) {
      throw new DecodeError(`a frame of ${length} bytes is over the limit of ${this.maxFrame}`);
    }
    if (this.pending < 4 + length) return null;
    const body = this.buffer.subarray(this.offset + 4, this.offset + 4 + length);
    this.offset += 4 + length;
    return body;
  }
}
