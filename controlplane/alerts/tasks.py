"""Webhook delivery (Celery): one task per message send, and beat's sweep for due ones."""

from celery import shared_task

from controlplane.alerts import services


@shared_task(name=services.DELIVER_TASK, acks_late=True, ignore_result=True)
def deliver_message(message_id: str) -> str:
    """Idempotent: a message that is not due, or already claimed, is left alone."""
    return services.deliver(message_id)


@shared_task(name="alerts.enqueue_due_messages", ignore_result=True)
def enqueue_due_messages() -> int:
    return services.enqueue_due_messages()
