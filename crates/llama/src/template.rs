//! Chat templates from GGUF metadata, rendered with minijinja (Jinja2 as in HF tokenizers).

use minijinja::{context, Environment, Error, ErrorKind};
use tokenfab_engine::ChatTurn;

pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

/// ChatML, the fallback for models that ship no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + \
message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}\
{{ '<|im_start|>assistant\n' }}{% endif %}";

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub(crate) fn new(source: Option<String>, bos: String, eos: String) -> Result<Self, Error> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.unwrap_or_else(|| CHATML.to_owned()))?;
        Ok(ChatTemplate { env, bos, eos })
    }

    pub(crate) fn render(&self, turns: &[ChatTurn]) -> Result<String, Error> {
        let messages: Vec<_> = turns
            .iter()
            .map(|t| context! { role => t.role, content => t.content })
            .collect();
        self.env.get_template("chat")?.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders_generation_prompt() {
        let t = ChatTemplate::new(None, String::new(), String::new()).expect("template");
        let out = t
            .render(&[ChatTurn {
                role: "user".into(),
                content: "hi".into(),
            }])
            .expect("render");
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error_not_a_panic() {
        let t = ChatTemplate::new(
            Some("{{ raise_exception('no system role') }}".into()),
            String::new(),
            String::new(),
        )
        .expect("template");
        assert!(t.render(&[]).is_err());
    }
}
