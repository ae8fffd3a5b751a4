"""A media resolver for tests: describes a non-text message from its file reference."""

from watibot.store.records import BufferedMessage


async def resolve(message: BufferedMessage) -> str:
    return f"<{message.type} at {message.data} showing a double room> {message.text or ''}".strip()
