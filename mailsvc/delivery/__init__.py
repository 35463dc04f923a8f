"""Delivery: the queue runner and the agents that carry messages one step on."""

from mailsvc.delivery.local import LocalDeliveryAgent
from mailsvc.delivery.runner import QueueRunner

__all__ = ["LocalDeliveryAgent", "QueueRunner"]
