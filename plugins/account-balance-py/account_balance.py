"""account-balance-py: the `account-balance` example projection, in Python.

One document per account in collection `accounts`, keyed by the account's stream id, built
with componentize-py against `wit/plugin.wit` (world `projection`). It does what the Rust
plugin (`plugins/account-balance`, on `plugins/sdk`) does, event for event: the same
documents (the same JSON bytes: same fields in the same order, compact), the same failures
(the same event index; the same messages, less the " at line L column C" serde_json ends a
payload's error with), the same per-batch cache of documents (one
host `get` per document at most, one `put` per changed document when the batch ends) and the
same `log.begin-event` calls.

Payloads are decoded the way serde_json decodes the Rust plugin's structs: unknown fields are
ignored; a missing or mistyped field, a known field given twice, a fraction, `-0` or a number
past i64 where an integer is expected fail the event; a JSON array is taken as the fields in
order. (Text that is not JSON at all, which the host never delivers, fails too, in other words.)
"""

import json

from componentize_py_types import Err
from wit_world import WitWorld as _World
from wit_world.imports import log, state
from wit_world.imports.types import Collection, Descriptor, HandleError

NAME = "account-balance-py"
VERSION = "1.0.0"
EVENT_TYPES = ["AccountOpened", "Deposited", "Withdrawn", "AccountClosed"]
ACCOUNTS = "accounts"
INDEXES = ["owner", "status"]

# `event-index` for no single event: the batch as a whole (u32::MAX).
WHOLE_BATCH = 4294967295

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
U64_MAX = 2**64 - 1

# A document's fields, in the order the Rust plugin's `Account` serializes them.
ACCOUNT_FIELDS = (
    ("owner", "string"),
    ("currency", "string"),
    ("balance", "i64"),
    ("tx_count", "u64"),
    ("status", "string"),
    ("last_version", "u64"),
)
OPENED_FIELDS = (("owner", "string"), ("currency", "string"))
AMOUNT_FIELDS = (("amount", "i64"),)


class PluginError(Exception):
    """A failure of the event being handled: a message for the operator (the SDK's `Error`)."""


# --- JSON, decoded as serde_json decodes a Rust struct ---------------------------------------


class _Object(list):
    """A JSON object's members in order, duplicates kept (serde refuses a field given twice)."""


class _NegativeZero:
    """`-0`: serde_json reads it as the float -0.0, which no integer field accepts."""


_NEGATIVE_ZERO = _NegativeZero()


def _parse_int(text):
    """An integer as serde_json reads it: `-0` and integers past i64 and u64 are floats."""
    if text == "-0":
        return _NEGATIVE_ZERO
    if len(text) > 21:  # past u64 whatever the digits (and past int()'s limit on digits)
        return float(text)
    value = int(text)
    return value if I64_MIN <= value <= U64_MAX else float(value)


def _no_constant(name):
    raise ValueError(f"expected value ({name} is not JSON)")


def _describe(value):
    """How serde names a value of the wrong type."""
    if value is None:
        return "null"
    if value is True or value is False:
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if value is _NEGATIVE_ZERO:
        return "floating point `-0.0`"
    if isinstance(value, float):
        return f"floating point `{repr(value).replace('e-0', 'e-').replace('e+0', 'e+')}`"
    if isinstance(value, str):
        return f"string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, _Object):
        return "map"
    return "sequence"


def _field(value, kind, path):
    """`value` as a field of `kind` (`string`, `i64`, `u64`), or the SDK's complaint, which
    starts with the field's path (`amount: invalid type: ...`)."""
    try:
        return _typed(value, kind)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _typed(value, kind):
    if kind == "string":
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("lone leading surrogate in hex escape") from None
            return value
        raise ValueError(f"invalid type: {_describe(value)}, expected a string")
    if isinstance(value, int) and not isinstance(value, bool):
        low, high = (I64_MIN, I64_MAX) if kind == "i64" else (0, U64_MAX)
        if low <= value <= high:
            return value
        raise ValueError(f"invalid value: integer `{value}`, expected {kind}")
    raise ValueError(f"invalid type: {_describe(value)}, expected {kind}")


def decode_struct(data, fields, struct):
    """The JSON bytes `data` as the struct `struct` with `fields` ((name, kind), ...): a dict."""
    text = bytes(data).decode("utf-8")
    value = json.loads(
        text,
        object_pairs_hook=_Object,
        parse_int=_parse_int,
        parse_constant=_no_constant,
    )
    if isinstance(value, _Object):
        kinds = dict(fields)
        out = {}
        for name, member in value:
            kind = kinds.get(name)
            if kind is None:
                continue
            if name in out:
                raise ValueError(f"duplicate field `{name}`")
            out[name] = _field(member, kind, name)
        for name, _ in fields:
            if name not in out:
                raise ValueError(f"missing field `{name}`")
        return out
    if isinstance(value, list):
        if len(value) < len(fields):
            raise ValueError(
                f"invalid length {len(value)}, expected struct {struct} with "
                f"{len(fields)} element{'s' if len(fields) != 1 else ''}"
            )
        if len(value) > len(fields):
            raise ValueError("trailing characters")
        return {
            name: _field(member, kind, f"[{index}]")
            for index, ((name, kind), member) in enumerate(zip(fields, value))
        }
    raise ValueError(f"invalid type: {_describe(value)}, expected struct {struct}")


def payload(event, fields, struct):
    """The event's payload as `struct`, naming the event type on failure (`Event::payload`)."""
    try:
        return decode_struct(event.payload, fields, struct)
    except (ValueError, RecursionError) as err:
        raise PluginError(f"invalid {event.event_type} payload: {err}") from None


def encode_account(account):
    """The document's bytes: serde_json's compact form, fields in the struct's order."""
    ordered = {name: account[name] for name, _ in ACCOUNT_FIELDS}
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --- The batch's documents (the SDK's `State`) ------------------------------------------------


class _Entry:
    """A cached document: `absent` (no document), `raw` (bytes from the host, not yet decoded)
    or `typed` (an account dict); `dirty` when it must be written back."""

    __slots__ = ("slot", "value", "dirty")

    def __init__(self, slot, value, dirty):
        self.slot, self.value, self.dirty = slot, value, dirty


class State:
    """Documents read and written during one batch, each read from the host at most once and
    written back once, when the batch ends (`flush`)."""

    def __init__(self):
        self.collections = {}

    def _entry(self, collection, key):
        docs = self.collections.setdefault(collection, {})
        entry = docs.get(key)
        if entry is None:
            raw = state.get(collection, key)
            entry = _Entry("absent", None, False) if raw is None else _Entry("raw", raw, False)
            docs[key] = entry
        return entry

    def put(self, collection, key, document):
        self.collections.setdefault(collection, {})[key] = _Entry("typed", document, True)

    def account(self, collection, key):
        """The entry's account, decoded in place; None when there is no document."""
        entry = self._entry(collection, key)
        if entry.slot == "absent":
            return entry, None
        if entry.slot == "raw":
            try:
                entry.value = decode_struct(entry.value, ACCOUNT_FIELDS, "Account")
            except (ValueError, RecursionError) as err:
                raise PluginError(
                    f"document {collection}/{key} does not decode as "
                    f"account_balance::Account: {err}"
                ) from None
            entry.slot = "typed"
        return entry, entry.value

    def flush(self):
        """Writes every changed document to the host, in no particular order (the host sorts)."""
        for collection, docs in self.collections.items():
            for key, entry in docs.items():
                if not entry.dirty:
                    continue
                if entry.slot == "absent":
                    state.delete(collection, key)
                elif entry.slot == "raw":
                    state.put(collection, key, entry.value)
                else:
                    state.put(collection, key, encode_account(entry.value))


# --- The projection -------------------------------------------------------------------------


def handle_event(event, docs):
    """Applies one event (`AccountBalance::handle` of the Rust plugin)."""
    key, version, event_type = event.stream, event.version, event.event_type
    if event_type == "AccountOpened":
        opened = payload(event, OPENED_FIELDS, "Opened")
        docs.put(
            ACCOUNTS,
            key,
            {
                "owner": opened["owner"],
                "currency": opened["currency"],
                "balance": 0,
                "tx_count": 0,
                "status": "open",
                "last_version": version,
            },
        )
        return
    if event_type == "Deposited":
        delta, verb = payload(event, AMOUNT_FIELDS, "Amount")["amount"], "deposit"
    elif event_type == "Withdrawn":
        delta, verb = payload(event, AMOUNT_FIELDS, "Amount")["amount"], "withdrawal"
    else:
        delta, verb = 0, ""
    entry, account = docs.account(ACCOUNTS, key)
    if account is None:
        raise PluginError(f"account {key} was never opened")
    # Money must not wrap: a balance past i64's range fails the event, by name.
    balance = account["balance"] - delta if verb == "withdrawal" else account["balance"] + delta
    if not I64_MIN <= balance <= I64_MAX:
        raise PluginError(
            f"account {key}: a {verb} of {delta} would take the balance "
            f"{account['balance']} out of range"
        )
    account["balance"] = balance
    # u64, wrapping as the Rust plugin's release build does.
    account["tx_count"] = (account["tx_count"] + 1) & U64_MAX
    account["last_version"] = version
    if event_type == "AccountClosed":
        account["status"] = "closed"
    entry.dirty = True


def _panic(index, err):
    """Like the Rust SDK's panic hook: tell the host which event a bug hit, before the trap."""
    try:
        log.report_panic(index, f"{type(err).__name__}: {err}")
    except BaseException:
        pass


class WitWorld(_World):
    def describe(self):
        try:
            return Descriptor(
                name=NAME,
                version=VERSION,
                event_types=list(EVENT_TYPES),
                collections=[Collection(name=ACCOUNTS, indexes=list(INDEXES))],
            )
        except Exception as err:
            _panic(WHOLE_BATCH, err)
            raise

    def handle(self, events):
        current = WHOLE_BATCH
        try:
            docs = State()
            for index, event in enumerate(events):
                current = index if index < WHOLE_BATCH else WHOLE_BATCH
                log.begin_event(current)
                try:
                    handle_event(event, docs)
                except PluginError as err:
                    raise Err(
                        HandleError(
                            event_index=index,
                            message=f"{event.event_type} (version {event.version} of stream "
                            f"{event.stream}): {err}",
                        )
                    ) from None
            # Past the events: writing back the documents is the batch's doing.
            current = WHOLE_BATCH
            log.begin_event(WHOLE_BATCH)
            try:
                docs.flush()
            except (TypeError, ValueError, UnicodeError) as err:
                raise Err(
                    HandleError(
                        event_index=WHOLE_BATCH,
                        message="flushing the batch's documents failed, a document could "
                        f"not be serialized: {err}",
                    )
                ) from None
        except Err:
            raise
        except Exception as err:
            # A bug, not a failed event: the SDK's panic, which traps the instance.
            _panic(current, err)
            raise
