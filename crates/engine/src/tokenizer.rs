//! Text ↔ tokens for the model an engine serves. Implemented by the executor's crate
//! (`tokenfab-llama` reads the GGUF vocabulary and chat template).

use tokenfab_types::TokenId;

/// One chat message, already flattened to text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

pub trait Tokenizer: Send + Sync {
    /// Tokenize a prompt (special tokens in the text are parsed as such; BOS is added when
    /// the model asks for it).
    fn encode(&self, text: &str) -> Vec<TokenId>;

    /// The bytes of one token (may be part of a UTF-8 character).
    fn token_bytes(&self, token: TokenId) -> Vec<u8>;

    /// Render a conversation with the model's chat template, ending with the assistant's
    /// generation prompt.
    fn render_chat(&self, turns: &[ChatTurn]) -> Result<String, String>;
}

/// Turns a stream of token bytes into valid UTF-8 text, holding back incomplete characters.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Append bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_owned();
                self.pending.clear();
                out
            }
            Err(e) if e.error_len().is_none() => {
                // An incomplete character at the end: keep it for the next token.
                let valid = e.valid_up_to();
                let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                out
            }
            Err(_) => {
                let out = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                out
            }
        }
    }

    /// Whatever is left at the end of the stream (invalid bytes become U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_holds_back_split_characters() {
        let mut s = Utf8Stream::default();
        let euro = "€".as_bytes();
        assert_eq!(s.push(&euro[..1]), "");
        assert_eq!(s.push(&euro[1..]), "€");
        assert_eq!(s.push(b"ab"), "ab");
        assert_eq!(s.push(&[0xff, b'c']), "\u{fffd}c");
        assert_eq!(s.push(&euro[..2]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }
}
