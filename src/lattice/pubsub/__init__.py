"""Publish/subscribe over a gossipsub v1.1 mesh (``/meshsub/1.1.0``): wire format, sans-IO router,
service."""

from .protocol import MAX_RPC, PROTOCOL_ID, RPC, Message, message_id
from .router import GossipRouter
from .service import PubSub

__all__ = ["MAX_RPC", "PROTOCOL_ID", "RPC", "GossipRouter", "Message", "PubSub", "message_id"]
