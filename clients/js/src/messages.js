// The messages of the client protocol (docs/protocol.md, "Client to
// node"), in the order of src/wire/messages.rs: a variant's place is its
// kind on the wire. Golden vectors written by the Rust tests
// (test/vectors.json) keep the two in step.

import {
  bool,
  bytes,
  enumOf,
  nodeId,
  option,
  socketAddr,
  string,
  struct,
  tuple,
  u32,
  u64,
  u64big,
  vec,
} from './codec.js';

/** The protocol version this client speaks; nodes of another refuse it. */
export const PROTOCOL_VERSION = 10;

/** A node's default limit on a frame's body (1 MiB + 4 KiB). */
export const DEFAULT_MAX_FRAME = 1_052_672;

/** The largest payload an event may carry. */
export const MAX_PAYLOAD = 1024 * 1024;

/** QUIC application error codes, by number: a closed session's `closeCode`. */
export const ERROR_CODES = [
  'CLOSED',
  'MALFORMED_FRAME',
  'FRAME_TOO_LARGE',
  'UNKNOWN_MESSAGE',
  'VERSION_MISMATCH',
  'HELLO_REQUIRED',
  'IDENTITY_MISMATCH',
  'DUPLICATE_CONNECTION',
  'CLUSTER_MISMATCH',
  'PROTOCOL_VIOLATION',
  'CERTIFICATE_REQUIRED',
  'SLOW_CONSUMER',
  'NOT_A_NODE',
  'SHUTTING_DOWN',
  'TOKEN_REFUSED',
];

const headers = vec(tuple(string, string));

export const EventId = struct({ publisher: u64big, seq: u64 });

export const Event = struct({ id: EventId, origin: nodeId, topic: string, headers, payload: bytes });

export const Published = struct({ id: EventId, topic: string, headers, payload: bytes });

export const ReplyTo = struct({ node: nodeId, inbox: u64big, request: u64 });

export const RetentionLimits = struct({ max_events: u64, max_bytes: u64, max_age_ms: u64 });

export const Grant = struct({ publish: vec(string), subscribe: vec(string) });

export const RequestError = enumOf([
  'InvalidPattern',
  'InvalidTopic',
  'InvalidGroup',
  'DuplicateSubscription',
  'UnknownSubscription',
  'InvalidDurableName',
  'DurableInUse',
  'DurableMismatch',
  'DurableElsewhere',
  'Store',
  'TooManySubscriptions',
  'PermissionDenied',
  'UnknownNode',
  'TooManyQuestions',
]);

/** What a client may ask of any node of the tree. */
export const Question = enumOf(['Status', 'Tree']);

export const DirectoryEntry = struct({
  id: nodeId,
  name: string,
  parent: option(nodeId),
  rtt_us: u64,
  max_children: u32,
  addrs: vec(socketAddr),
  epoch: u64,
});

export const Destination = enumOf([
  ['Node', nodeId],
  ['Named', string],
]);

export const PeerStatus = struct({
  id: nodeId,
  name: string,
  addr: string,
  rtt_us: u64,
  role: string,
  queued_bytes: u64,
  events_dropped: u64,
});

export const SubscriptionStatus = struct({
  pattern: string,
  group: option(string),
  local: u32,
  edges: vec(tuple(nodeId, u32)),
});

export const DurableStatus = struct({
  name: string,
  pattern: string,
  home: nodeId,
  full: bool,
  attached: bool,
  waiting_for_home: bool,
  held: option(u64),
  held_bytes: option(u64),
});

export const Counters = struct({
  events_published: u64,
  events_received: u64,
  events_forwarded: u64,
  events_delivered: u64,
  events_dropped: u64,
  events_unroutable: u64,
  events_stored: u64,
  events_refused: u64,
  events_redelivered: u64,
  operations_denied: u64,
  publishes_throttled: u64,
  requests_without_responders: u64,
  replies_undeliverable: u64,
  events_replayed: u64,
  replays_filled: u64,
});

export const NodeStatus = struct({
  id: nodeId,
  name: string,
  cluster: string,
  addr: string,
  root: nodeId,
  root_addrs: option(vec(socketAddr)),
  parent: option(nodeId),
  depth: u32,
  subtree: u32,
  peers: vec(PeerStatus),
  subscriptions: vec(SubscriptionStatus),
  durables: vec(DurableStatus),
  outbox: u64,
  outbox_unreachable: u64,
  connections: u64,
  clients: u64,
  congested: u64,
  counters: Counters,
});

/** The control stream, client to node. */
export const ClientRequest = enumOf([
  ['Hello', struct({ version: u32, name: string })],
  ['Subscribe', struct({ sub: u64, pattern: string, group: option(string) })],
  ['Unsubscribe', struct({ sub: u64 })],
  ['Status', struct({ request: u64 })],
  ['WaitInterest', struct({ request: u64, topic: string, timeout_ms: u32 })],
  ['Tree', struct({ request: u64 })],
  [
    'SubscribeDurable',
    struct({ sub: u64, name: string, pattern: string, limits: RetentionLimits, ack_wait_ms: u32 }),
  ],
  ['AckDurable', struct({ sub: u64, position: u64 })],
  ['HelloWithToken', struct({ version: u32, name: string, token: string })],
  ['Ask', struct({ request: u64, node: nodeId, question: Question })],
]);

/** The control stream, node to client. */
export const ClientReply = enumOf([
  [
    'Welcome',
    struct({ version: u32, node: nodeId, name: string, cluster: string, user: option(string), grant: Grant }),
  ],
  ['Subscribed', struct({ sub: u64 })],
  ['Unsubscribed', struct({ sub: u64 })],
  ['Status', struct({ request: u64, status: NodeStatus })],
  ['Interest', struct({ request: u64, present: bool })],
  ['Error', struct({ request: u64, error: RequestError, message: string })],
  ['Tree', struct({ request: u64, nodes: vec(DirectoryEntry) })],
  ['DurableAttached', struct({ sub: u64, first: u64, backlog: u64 })],
]);

/** A publish stream, client to node. */
export const PublishFrame = enumOf([
  ['Event', Published],
  ['Flush', u64],
  ['Directed', struct({ event: Published, to: Destination })],
  ['AtLeastOnce', Published],
  ['Request', struct({ event: Published, request: u64 })],
  ['Reply', struct({ event: Published, to: ReplyTo })],
]);

export const PublishRefusal = enumOf(['RetentionLimit', 'StoreFull', 'StoreError', 'PermissionDenied']);

export const RequestFailure = enumOf(['NoResponders', 'PermissionDenied']);

/** A publish stream, node to client. */
export const PublishReply = enumOf([
  ['Flushed', u64],
  ['Acked', struct({ up_to: u64 })],
  ['Refused', struct({ seq: u64, reason: PublishRefusal, message: string })],
  ['RequestFailed', struct({ request: u64, reason: RequestFailure, message: string })],
  ['Released', struct({ up_to: u64 })],
]);

/** The delivery stream, node to client. */
export const Delivery = enumOf([
  ['Event', struct({ sub: u64, event: Event })],
  ['Durable', struct({ sub: u64, position: u64, event: Event })],
  ['Request', struct({ sub: u64, event: Event, reply: ReplyTo })],
  ['Reply', struct({ request: u64, event: Event })],
]);
