//! A tokenizer for mock models: one token per byte, a plain chat template.

use tokenfab_engine::{ChatTurn, Tokenizer};
use tokenfab_types::TokenId;

#[derive(Clone, Copy, Debug, Default)]
pub struct ByteTokenizer;

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Vec<TokenId> {
        text.bytes().map(|b| TokenId(i32::from(b))).collect()
    }

    fn token_bytes(&self, token: TokenId) -> Vec<u8> {
        u8::try_from(token.0).map(|b| vec![b]).unwrap_or_default()
    }

    fn render_chat(&self, turns: &[ChatTurn]) -> Result<String, String> {
        let mut out = String::new();
        for t in turns {
            out.push_str(&t.role);
            out.push_str(": ");
            out.push_str(&t.content);
            out.push('\n');
        }
        out.push_str("assistant: ");
        Ok(out)
    }
}
