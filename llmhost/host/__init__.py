"""The host core: one process per machine that owns every engine and drives them from one loop thread, and the
client the API process uses to talk to it through small typed messages."""
