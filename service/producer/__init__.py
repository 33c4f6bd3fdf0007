"""The producer side: the publisher library, the backend client, its cursor and the bridge."""
