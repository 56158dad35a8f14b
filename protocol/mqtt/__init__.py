"""MQTT: the link both roles speak over, broker URLs, the embedded broker, and Mosquitto configuration for a fleet."""
