"""watibot: an AI agent behind a WhatsApp (WATI) number, coordinated by PostgreSQL."""
