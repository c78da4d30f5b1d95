//! The engine against a brute-force transcription of the rules over the whole ping history.
