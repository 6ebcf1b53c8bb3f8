// Types of the TreeScale browser client (src/treescale.js).

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION: number;
/** The largest payload an event may carry, in bytes. */
export const MAX_PAYLOAD: number;
/** QUIC application error codes by number: a closed session's `closeCode`. */
export const ERROR_CODES: readonly string[];

/**
 * Every failure the client reports. `code` names it: a node's request
 * error (`PermissionDenied`, `InvalidPattern`, …), a session's close code
 * (`TOKEN_REFUSED`, `SLOW_CONSUMER`, …), or one of the client's own:
 * `Closed`, `Timeout`, `NoResponders`, `PayloadTooLarge`, `Connect`,
 * `NotARequest`.
 */
export class TreeScaleError extends Error {
  readonly code: string;
}

export interface ConnectOptions {
  /** The node's WebTransport URL; without it, `/webtransport.json` beside the module says. */
  url?: string;
  /** SHA-256 of the node's web certificate, hex or base64 (not needed for a publicly trusted one). */
  certHash?: string | Uint8Array | null;
  /** From `treescale certs issue token --name NAME`; needed unless the node runs --insecure. */
  token?: string;
  /** Shown in the node's logs and status. Default `browser`. */
  name?: string;
  /** Events a subscription holds unread before the client stops reading deliveries. Default 10,000. */
  subscriptionBound?: number;
}

/** Opens a session with a node and says hello. */
export function connect(options?: ConnectOptions): Promise<Client>;

/** Whether `pattern` (with `*` and a final `>`) matches `topic`. */
export function matches(pattern: string, topic: string): boolean;

export type Headers = [string, string][];

export interface PublishOptions {
  headers?: Headers;
}

export class Event {
  readonly topic: string;
  readonly payload: Uint8Array;
  readonly headers: Headers;
  /** Unique across the overlay. */
  readonly id: { publisher: bigint; seq: number };
  /** The id (64 hex digits) of the node where the event entered the overlay. */
  readonly origin: string;
  /** The payload as UTF-8 text. */
  text(): string;
  /** Whether this is a request, to answer with `respond`. */
  readonly isRequest: boolean;
  /** Answers this request. */
  respond(data: string | Uint8Array, options?: PublishOptions): Promise<void>;
}

export class Subscription implements AsyncIterableIterator<Event> {
  readonly sub: number;
  readonly pattern: string;
  readonly group: string | null;
  next(): Promise<IteratorResult<Event, undefined>>;
  return(): Promise<IteratorResult<Event, undefined>>;
  [Symbol.asyncIterator](): this;
  unsubscribe(): Promise<void>;
}

export interface Grant {
  publish: string[];
  subscribe: string[];
}

/** One node of the tree. */
export interface DirectoryEntry {
  id: string;
  name: string;
  parent: string | null;
  rtt_us: number;
  max_children: number;
  addrs: string[];
  /** Grows each time the node changes parents (start time in ms × 1024, plus moves). */
  epoch: number;
}

export interface PeerStatus {
  id: string;
  name: string;
  addr: string;
  rtt_us: number;
  role: 'parent' | 'child' | 'peer';
  queued_bytes: number;
  events_dropped: number;
}

export interface SubscriptionStatus {
  pattern: string;
  group: string | null;
  local: number;
  edges: [string, number][];
}

export interface DurableStatus {
  name: string;
  pattern: string;
  home: string;
  full: boolean;
  attached: boolean;
  waiting_for_home: boolean;
  held: number | null;
  held_bytes: number | null;
}

export interface Counters {
  events_published: number;
  events_received: number;
  events_forwarded: number;
  events_delivered: number;
  events_dropped: number;
  events_unroutable: number;
  events_stored: number;
  events_refused: number;
  events_redelivered: number;
  operations_denied: number;
  publishes_throttled: number;
  requests_without_responders: number;
  replies_undeliverable: number;
}

/** What `treescale status` shows of one node (docs/protocol.md, NodeStatus). */
export interface NodeStatus {
  id: string;
  name: string;
  cluster: string;
  addr: string;
  root: string;
  root_addrs: string[] | null;
  parent: string | null;
  depth: number;
  subtree: number;
  peers: PeerStatus[];
  subscriptions: SubscriptionStatus[];
  durables: DurableStatus[];
  outbox: number;
  outbox_unreachable: number;
  connections: number;
  clients: number;
  congested: number;
  counters: Counters;
}

export class Client {
  /** The node this session is with. */
  readonly node: { id: string; name: string; cluster: string };
  /** The token's user. */
  readonly user: string | null;
  /** What this client may publish to and subscribe to. */
  readonly grant: Grant;
  /** Publishes an event to every subscriber of `topic` (one member per queue group). */
  publish(topic: string, data: string | Uint8Array, options?: PublishOptions): Promise<void>;
  /** Resolves once the node has routed every event published before. */
  flush(): Promise<void>;
  subscribe(pattern: string, options?: { group?: string | null }): Promise<Subscription>;
  /** Sends a request and resolves with the first answer. */
  request(topic: string, data: string | Uint8Array, options?: PublishOptions & { timeoutMs?: number }): Promise<Event>;
  /** Whether a subscription anywhere in the overlay matches `topic`, waiting up to `timeoutMs`. */
  waitForInterest(topic: string, options?: { timeoutMs?: number }): Promise<boolean>;
  /** This client's node's status; with `node` (an id), any node's of the tree, asked through this one. */
  status(options?: { node?: string | null; timeoutMs?: number }): Promise<NodeStatus>;
  /** A node's subtree, the node first; asked of the root, the whole tree. */
  tree(options?: { node?: string | null; timeoutMs?: number }): Promise<DirectoryEntry[]>;
  /** Resolves with the error that ended the session (`CLOSED` after `close`). */
  readonly closed: Promise<TreeScaleError>;
  /** Flushes what was published, then closes the session. */
  close(): Promise<void>;
}
