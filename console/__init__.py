"""The Jetbox web console (`jbctl console`): pages, JSON API and live updates over the event log."""
