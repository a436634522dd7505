"""The wire contract's one namespace: re-exports only, no definitions of its own.

Callers write ``from agent.contract import protocol`` and ``protocol.X``; this module gathers
the public names of the contract's modules so that keeps working, and so one ``protocol.``
prefix still reads as "the wire contract". New code may import from the owning module.

Where each thing lives::

    agent.contract.ids        the rules for ids, versions, request ids, topic prefixes and
                              charsets (ID_RE, VERSION_RE, is_valid_*, topic_charset_problem)
    agent.contract.topics     Topics, FleetTopics, TopicKind, FleetTopicKind, ReplyAddress,
                              reply_address_problem, parse_node_topic, CONTRACT_NAMESPACES,
                              RETAINED_WILDCARDS
    agent.contract.fields     JSON plumbing shared by the messages; now_ts, parse_ts
    agent.contract.spec       FunctionSpec, CodeSpec, SpecSignature, decode_spec, encode_spec,
                              spec_to_dict, signing_bytes, spec_fingerprint, code_bytes,
                              is_removal, requires_met, FLEET_TARGET, CODE_FORMATS, ENV_NAME_RE
    agent.contract.invoke     InvokeRequest, decode_invoke, encode_invoke, encode_reply,
                              encode_ok_reply_raw, decode_reply (InvokeDecodeError is
                              agent.errors')
    agent.contract.telemetry  status, heartbeat and function state messages, the roll call;
                              NODE_STATUSES, FUNCTION_STATES, MAX_ROLLCALL_WINDOW_S
    agent.contract.sync       sync delta / snapshot / desired / request messages, and the
                              pure compute_delta / apply_delta both ends build them with
    agent.contract.indexes    spec index and node catalog messages, MAX_INDEX_FUNCTIONS,
                              MAX_INDEX_BYTES

Decoders take raw payload bytes and raise the contract's errors, whose message names the
message, the field, what was wrong and the (truncated) value given::

    DeploymentRejected      a function spec (decode_spec, code_bytes)
    BadRequest              any other message (decode_status, decode_sync_desired, ...)
    └── InvokeDecodeError   an invocation; carries the request_id / function_id / reply_to
                            that could be salvaged so the error reply can still be sent

Encoders check their message with the same rules and raise ``ValueError`` (a value outside the
contract) or ``TypeError`` (a reply result that is not JSON): both are bugs in the caller, and
the agent never publishes a message that its own decoders would refuse.

Must never: define anything (a name belongs to one of the modules above), do I/O (no sockets,
no paho, no files, no logging), import anything beyond the stdlib and the pure
``agent.errors`` / ``agent.contract`` / ``agent.models``, or read any clock but
``time.time()`` (and that only for ``ts``). The worker may import this module.
"""

from __future__ import annotations

from agent.contract.fields import now_ts as now_ts
from agent.contract.fields import parse_ts as parse_ts
from agent.contract.ids import ID_RE as ID_RE
from agent.contract.ids import KEY_ID_RE as KEY_ID_RE
from agent.contract.ids import MAX_REQUEST_ID_CHARS as MAX_REQUEST_ID_CHARS
from agent.contract.ids import MAX_TOPIC_BYTES as MAX_TOPIC_BYTES
from agent.contract.ids import TOPIC_CHARSETS as TOPIC_CHARSETS
from agent.contract.ids import VERSION_RE as VERSION_RE
from agent.contract.ids import is_valid_id as is_valid_id
from agent.contract.ids import is_valid_prefix as is_valid_prefix
from agent.contract.ids import is_valid_publish_topic as is_valid_publish_topic
from agent.contract.ids import is_valid_request_id as is_valid_request_id
from agent.contract.ids import topic_charset_problem as topic_charset_problem
from agent.contract.indexes import MAX_INDEX_BYTES as MAX_INDEX_BYTES
from agent.contract.indexes import MAX_INDEX_FUNCTIONS as MAX_INDEX_FUNCTIONS
from agent.contract.indexes import decode_node_catalog as decode_node_catalog
from agent.contract.indexes import decode_spec_index as decode_spec_index
from agent.contract.indexes import encode_node_catalog as encode_node_catalog
from agent.contract.indexes import encode_spec_index as encode_spec_index
from agent.contract.invoke import InvokeRequest as InvokeRequest
from agent.contract.invoke import decode_invoke as decode_invoke
from agent.contract.invoke import decode_reply as decode_reply
from agent.contract.invoke import encode_invoke as encode_invoke
from agent.contract.invoke import encode_ok_reply_raw as encode_ok_reply_raw
from agent.contract.invoke import encode_reply as encode_reply
from agent.contract.spec import CODE_FORMATS as CODE_FORMATS
from agent.contract.spec import ENV_NAME_RE as ENV_NAME_RE
from agent.contract.spec import FLEET_TARGET as FLEET_TARGET
from agent.contract.spec import CodeSpec as CodeSpec
from agent.contract.spec import FunctionSpec as FunctionSpec
from agent.contract.spec import SpecSignature as SpecSignature
from agent.contract.spec import code_bytes as code_bytes
from agent.contract.spec import decode_spec as decode_spec
from agent.contract.spec import encode_spec as encode_spec
from agent.contract.spec import is_removal as is_removal
from agent.contract.spec import requires_met as requires_met
from agent.contract.spec import signing_bytes as signing_bytes
from agent.contract.spec import spec_fingerprint as spec_fingerprint
from agent.contract.spec import spec_to_dict as spec_to_dict
from agent.contract.sync import apply_delta as apply_delta
from agent.contract.sync import compute_delta as compute_delta
from agent.contract.sync import decode_sync_delta as decode_sync_delta
from agent.contract.sync import decode_sync_desired as decode_sync_desired
from agent.contract.sync import decode_sync_request as decode_sync_request
from agent.contract.sync import decode_sync_snapshot as decode_sync_snapshot
from agent.contract.sync import encode_sync_delta as encode_sync_delta
from agent.contract.sync import encode_sync_desired as encode_sync_desired
from agent.contract.sync import encode_sync_request as encode_sync_request
from agent.contract.sync import encode_sync_snapshot as encode_sync_snapshot
from agent.contract.telemetry import FUNCTION_STATES as FUNCTION_STATES
from agent.contract.telemetry import MAX_ROLLCALL_WINDOW_S as MAX_ROLLCALL_WINDOW_S
from agent.contract.telemetry import NODE_STATUSES as NODE_STATUSES
from agent.contract.telemetry import decode_function_state as decode_function_state
from agent.contract.telemetry import decode_heartbeat as decode_heartbeat
from agent.contract.telemetry import decode_rollcall as decode_rollcall
from agent.contract.telemetry import decode_status as decode_status
from agent.contract.telemetry import encode_function_state as encode_function_state
from agent.contract.telemetry import encode_heartbeat as encode_heartbeat
from agent.contract.telemetry import encode_rollcall as encode_rollcall
from agent.contract.telemetry import encode_status as encode_status
from agent.contract.topics import CONTRACT_NAMESPACES as CONTRACT_NAMESPACES
from agent.contract.topics import RETAINED_WILDCARDS as RETAINED_WILDCARDS
from agent.contract.topics import FleetTopicKind as FleetTopicKind
from agent.contract.topics import FleetTopics as FleetTopics
from agent.contract.topics import ReplyAddress as ReplyAddress
from agent.contract.topics import TopicKind as TopicKind
from agent.contract.topics import Topics as Topics
from agent.contract.topics import parse_node_topic as parse_node_topic
from agent.contract.topics import reply_address_problem as reply_address_problem
from agent.errors import InvokeDecodeError as InvokeDecodeError  # the tree is in agent.errors
