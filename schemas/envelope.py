"""Raw event envelope v1: the contract every channel producer writes to the `raw.*` topics."""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)

__all__ = [
    "DEFAULT_IDENTIFIER_TYPES",
    "EVENT_MODELS",
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "SOURCE_FAMILIES",
    "CallAttributes",
    "CallEvent",
    "CartItem",
    "CartUpdatedAttributes",
    "CartUpdatedEvent",
    "ChannelFamily",
    "ConsentChangedAttributes",
    "ConsentChangedEvent",
    "Currency",
    "EmailClickedAttributes",
    "EmailClickedEvent",
    "EmailOpenedAttributes",
    "EmailOpenedEvent",
    "EraseAttributes",
    "EraseEvent",
    "IdentifierIn",
    "IdentifyAttributes",
    "IdentifyEvent",
    "LoginAttributes",
    "LoginEvent",
    "LogoutAttributes",
    "LogoutEvent",
    "MessageAttributes",
    "MessageReceivedEvent",
    "MessageSentEvent",
    "Money",
    "OrderPlacedAttributes",
    "OrderPlacedEvent",
    "PageViewAttributes",
    "PageViewEvent",
    "ProductViewAttributes",
    "ProductViewEvent",
    "PushOpenedAttributes",
    "PushOpenedEvent",
    "RawEvent",
    "RawEventV1",
    "SignupAttributes",
    "SignupEvent",
    "StorePurchaseAttributes",
    "StorePurchaseEvent",
]

SCHEMA_VERSION = 1

# Strongest first: the order producers use to pick the Kafka key of a raw event, and the default set.
DEFAULT_IDENTIFIER_TYPES: tuple[str, ...] = (
    "customer_id",
    "loyalty_card",
    "phone",
    "email",
    "device_id",
    "cookie_id",
)


class ChannelFamily(StrEnum):
    """Where a touchpoint happens; reports and channel-mix counters group sources by it."""

    ONLINE = "online"
    OFFLINE = "offline"
    MESSAGING = "messaging"
    CRM = "crm"


SOURCE_FAMILIES: MappingProxyType[str, ChannelFamily] = MappingProxyType(
    {
        "web": ChannelFamily.ONLINE,
        "app": ChannelFamily.ONLINE,
        "pos": ChannelFamily.OFFLINE,
        "call_center": ChannelFamily.OFFLINE,
        "esp": ChannelFamily.MESSAGING,
        "sms": ChannelFamily.MESSAGING,
        "viber": ChannelFamily.MESSAGING,
        "push": ChannelFamily.MESSAGING,
        "webpush": ChannelFamily.MESSAGING,
        "messenger": ChannelFamily.MESSAGING,
        "crm": ChannelFamily.CRM,
    }
)


def _refuse_float(value: Any) -> Any:
    """JSON floats lose cents (0.1 + 0.2); money must arrive as a decimal string or an integer."""
    if isinstance(value, float):
        raise ValueError("money must be a decimal string or an integer, never a JSON float")
    return value


Money = Annotated[
    Decimal,
    BeforeValidator(_refuse_float),
    Field(allow_inf_nan=False),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "pattern": r"^-?\d+(\.\d+)?$"}, {"type": "integer"}],
            "description": 'Decimal amount as a string (e.g. "1290.00") or an integer; never a JSON float.',
        },
        mode="validation",
    ),
]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
_Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
_Label = Annotated[str, StringConstraints(min_length=1, max_length=64)]

_OPEN = ConfigDict(frozen=True, extra="allow")


class IdentifierIn(BaseModel):
    """One identifier as the producer saw it; numbers are accepted as strings (card numbers often are)."""

    model_config = ConfigDict(frozen=True, extra="allow", coerce_numbers_to_str=True)

    type: _Label = Field(description="phone, email, device_id, loyalty_card, customer_id, cookie_id, …")
    value: str
    verified: bool = Field(False, description="The producer checked it (OTP, login, card scan).")


class CartItem(BaseModel):
    """One cart or order line; cart events carry the full cart so consumers never diff."""

    model_config = _OPEN

    product_id: _Id
    qty: int = Field(ge=0)
    price: Money | None = None
    name: str | None = None
    category: str | None = None


class PageViewAttributes(BaseModel):
    """A page or screen was shown."""

    model_config = _OPEN

    url: str | None = None
    path: str | None = None
    referrer: str | None = None
    title: str | None = None


class ProductViewAttributes(BaseModel):
    """A product card was shown."""

    model_config = _OPEN

    product_id: _Id
    category: str | None = None
    price: Money | None = None
    currency: Currency | None = None


class CartUpdatedAttributes(BaseModel):
    """The whole cart after the change."""

    model_config = _OPEN

    cart_id: str | None = None
    items: list[CartItem]
    total: Money | None = None
    currency: Currency | None = None


class OrderPlacedAttributes(BaseModel):
    """An online order (web, app, call centre)."""

    model_config = _OPEN

    order_id: _Id
    total: Money
    currency: Currency
    items: list[CartItem] = Field(default_factory=list)
    store_id: str | None = None
    payment_method: str | None = None


class StorePurchaseAttributes(BaseModel):
    """A purchase at a till."""

    model_config = _OPEN

    store_id: _Id
    order_id: _Id
    total: Money
    currency: Currency
    items: list[CartItem] = Field(default_factory=list)


class SignupAttributes(BaseModel):
    """An account was created."""

    model_config = _OPEN

    method: str | None = None


class LoginAttributes(BaseModel):
    """A session was authenticated."""

    model_config = _OPEN

    method: str | None = None


class LogoutAttributes(BaseModel):
    """A session ended (nothing typed yet; extra fields are kept)."""

    model_config = _OPEN


class CallAttributes(BaseModel):
    """A phone call with the call centre."""

    model_config = _OPEN

    direction: Literal["inbound", "outbound"] | None = None
    duration_s: int | None = Field(None, ge=0)
    agent_id: str | None = None
    reason: str | None = None


class MessageAttributes(BaseModel):
    """A message in or out on a messaging channel (sms, viber, email, push, messenger)."""

    model_config = _OPEN

    channel: _Label
    campaign: str | None = None
    sender: str | None = None
    message_id: str | None = None


class EmailOpenedAttributes(BaseModel):
    """An e-mail was opened (tracking pixel)."""

    model_config = _OPEN

    campaign: str | None = None
    message_id: str | None = None


class EmailClickedAttributes(BaseModel):
    """A link in an e-mail was clicked."""

    model_config = _OPEN

    campaign: str | None = None
    message_id: str | None = None
    url: str | None = None


class PushOpenedAttributes(BaseModel):
    """A push notification was opened."""

    model_config = _OPEN

    campaign: str | None = None
    message_id: str | None = None


class ConsentChangedAttributes(BaseModel):
    """Consent flags that changed, e.g. {"sms": false} after an unsubscribe."""

    model_config = _OPEN

    changes: dict[str, bool] = Field(min_length=1)
    reason: str | None = None


class IdentifyAttributes(BaseModel):
    """An explicit link: all identifiers of the event belong to one person (CRM import, login form)."""

    model_config = _OPEN

    reason: str | None = None
    record_id: str | None = None


class EraseAttributes(BaseModel):
    """Right to be forgotten: erase the profile owning these identifiers."""

    model_config = _OPEN

    request_id: str | None = None
    reason: str | None = None


class RawEventV1(BaseModel):
    """Fields shared by every event type; unknown fields are kept so producers can ship ahead of us."""

    model_config = _OPEN

    schema_version: Literal[1] = Field(description="Envelope version; anything else is refused.")
    event_id: _Id = Field(description="Producer-unique id, the idempotency key.")
    source: _Label = Field(description="Producing system: web, app, pos, call_center, esp, sms, …")
    channel: _Label = Field(description="Touchpoint within the source, e.g. store, checkout, newsletter.")
    occurred_at: AwareDatetime = Field(description="When it happened, ISO 8601 with an offset.")
    identifiers: list[IdentifierIn] = Field(min_length=1, max_length=64)
    consent: dict[str, bool] = Field(default_factory=dict)


class PageViewEvent(RawEventV1):
    """`page_view` envelope."""

    type: Literal["page_view"]
    attributes: PageViewAttributes = Field(default_factory=PageViewAttributes)


class ProductViewEvent(RawEventV1):
    """`product_view` envelope."""

    type: Literal["product_view"]
    attributes: ProductViewAttributes


class CartUpdatedEvent(RawEventV1):
    """`cart_updated` envelope."""

    type: Literal["cart_updated"]
    attributes: CartUpdatedAttributes


class OrderPlacedEvent(RawEventV1):
    """`order_placed` envelope."""

    type: Literal["order_placed"]
    attributes: OrderPlacedAttributes


class StorePurchaseEvent(RawEventV1):
    """`store_purchase` envelope."""

    type: Literal["store_purchase"]
    attributes: StorePurchaseAttributes


class SignupEvent(RawEventV1):
    """`signup` envelope."""

    type: Literal["signup"]
    attributes: SignupAttributes = Field(default_factory=SignupAttributes)


class LoginEvent(RawEventV1):
    """`login` envelope."""

    type: Literal["login"]
    attributes: LoginAttributes = Field(default_factory=LoginAttributes)


class LogoutEvent(RawEventV1):
    """`logout` envelope."""

    type: Literal["logout"]
    attributes: LogoutAttributes = Field(default_factory=LogoutAttributes)


class CallEvent(RawEventV1):
    """`call` envelope."""

    type: Literal["call"]
    attributes: CallAttributes = Field(default_factory=CallAttributes)


class MessageReceivedEvent(RawEventV1):
    """`message_received` envelope (the person wrote to us)."""

    type: Literal["message_received"]
    attributes: MessageAttributes


class MessageSentEvent(RawEventV1):
    """`message_sent` envelope (we wrote to the person)."""

    type: Literal["message_sent"]
    attributes: MessageAttributes


class EmailOpenedEvent(RawEventV1):
    """`email_opened` envelope."""

    type: Literal["email_opened"]
    attributes: EmailOpenedAttributes = Field(default_factory=EmailOpenedAttributes)


class EmailClickedEvent(RawEventV1):
    """`email_clicked` envelope."""

    type: Literal["email_clicked"]
    attributes: EmailClickedAttributes = Field(default_factory=EmailClickedAttributes)


class PushOpenedEvent(RawEventV1):
    """`push_opened` envelope."""

    type: Literal["push_opened"]
    attributes: PushOpenedAttributes = Field(default_factory=PushOpenedAttributes)


class ConsentChangedEvent(RawEventV1):
    """`consent_changed` envelope."""

    type: Literal["consent_changed"]
    attributes: ConsentChangedAttributes


class IdentifyEvent(RawEventV1):
    """`identify` envelope."""

    type: Literal["identify"]
    attributes: IdentifyAttributes = Field(default_factory=IdentifyAttributes)


class EraseEvent(RawEventV1):
    """`erase` envelope."""

    type: Literal["erase"]
    attributes: EraseAttributes = Field(default_factory=EraseAttributes)


RawEvent = Annotated[
    PageViewEvent
    | ProductViewEvent
    | CartUpdatedEvent
    | OrderPlacedEvent
    | StorePurchaseEvent
    | SignupEvent
    | LoginEvent
    | LogoutEvent
    | CallEvent
    | MessageReceivedEvent
    | MessageSentEvent
    | EmailOpenedEvent
    | EmailClickedEvent
    | PushOpenedEvent
    | ConsentChangedEvent
    | IdentifyEvent
    | EraseEvent,
    Field(discriminator="type"),
]

# event type → envelope model, read off the union so the two cannot disagree.
EVENT_MODELS: MappingProxyType[str, type[RawEventV1]] = MappingProxyType(
    {get_args(model.model_fields["type"].annotation)[0]: model for model in get_args(get_args(RawEvent)[0])}
)
EVENT_TYPES: frozenset[str] = frozenset(EVENT_MODELS)
