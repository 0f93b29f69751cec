"""Shared contracts of Tidepool's services: bus subjects, message models, state machine, configuration."""
