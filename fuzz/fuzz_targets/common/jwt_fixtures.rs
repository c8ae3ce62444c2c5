//! Key material shared by the JWT fuzz targets (`authz_jwt_token`, `authz_jwks`): public keys
//! of every family (RSA 2048, P-256, P-384, Ed25519) and an HMAC secret, and tokens of the issuer
//! `https://issuer.example` (audience `api.example`, no `exp`) signed by each family's private key
//! (`alg` RS256, PS256, ES256, ES384, EdDSA, HS256). The targets check at start that every token
//! verifies, or their no-forgery checks would be vacuous. Included with `#[path]`; not a target.

use meshwasm_authz::jwt::b64_encode;

pub const JWKS: &str = r#"{"keys":[{"kty":"RSA","kid":"rsa","n":"rORPTPcvixwI3wxFDXj1NNB03Ir3QmQFTeEQH_2M_0AIhZISAGZJH6pb2ielsLlavem07ufLlT6NNFtfQmxvSKNUWxpmBH9VBsNDUR0-njddYfa7P9CL-Vl6T5tR3pd0pVuWyawQZqMC5FZK8g_MRhG-tXA8PTsC9cHXqJE3dwiSNW8375KsYvXjT2_QX7TqzvHnuy8niqtBeWz1ZXw_zMFH2uqiocNxworOMSkrbG_cQXeiKh7_NC6YtF7dwoWN6JEjLuNbblWa3hcs7lXH85ZaNaZTSlC1b5sN8yha5cWRHVIer5xLJMKnEL0EbdVqSZYdmjz-NepKhDCThEinmQ","e":"AQAB"},{"kty":"EC","kid":"ec256","crv":"P-256","x":"eEcUPel7DgfmAQzXyF28mPzVMyvLnr-9Q_ea61luQGI","y":"iGF5qEdNiTbqjJVishtCwM-cXbgrwBcQS_U2stH9S6k"},{"kty":"EC","kid":"ec384","crv":"P-384","x":"Kv9rLeXDKOI5iJuZ41hSLfkCexQ3XJDMzZ6weylLCvH2pVTVrcFOJ9TpaYbfJbIF","y":"zzDajor15XxWxdQLnGbc5FmiWOtWpvrGmAX_mYJ0qHJS193WpltTg173s4T2pGDq"},{"kty":"OKP","kid":"ed","crv":"Ed25519","x":"4ApO2VdXYC8m6DpVjQzVTJq88CRnzbhwDPVk9E1jYsI"},{"kty":"oct","kid":"hs","k":"ZnV6eiB0YXJnZXQgSE1BQyBzZWNyZXQsIDMyIGIuLg"}]}"#;
pub const TOKENS: [&str; 6] = [
    "eyJhbGciOiJSUzI1NiIsImtpZCI6InJzYSJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.HuMBuiDYgynYwCAIjOW9rPgTtN-ELQrSTTMI97AFTaHjEE-B-AU5lebMV0dWbEF3P8i5ED7Q5_00EtJXG2eClOCSSf709K-K1nZVtxVdoYPzd6a5PEBWd63IFoOl1XRJn54kdb9gosf4lsUHtR0j70Siah8HSFkmJNGWVfEAdbSc06EPwOfxQvkFaCpzr7g4kXSURWzLSH8CtpSB2qCqZKZ1BwOBUenn0zKdkbvvPK89RZj2Ktj9oAFdhJLx4OVSycMqviTWsGv6UYCV1Qw0NajxlueXgz8rYm4tHfTAtm4oB6nFnNXc_laJL9J-Hb7dcbzlXW113VG3FHXD4cx9MA",
    "eyJhbGciOiJQUzI1NiIsImtpZCI6InJzYSJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.Bqk9y2m85LNzmDe11JcMUl4mRGsVzIsAIxXbnAuJabGkmJGRR18ttyquLQOxhe5w7v_Ob9rhtcHamHh-K5C1MpM4cuheoIJe1Fc2kF95fNB_6781k6GwZxrrNcBYDBah3JfYGKxJUvdhnfI6F6_K0Os0Spw5mT3_iPNTSWC_pdFKNaiAgkR6Q1HwZnTYrSH7pyCy1xRocj-J92X1WOwn79uz0fDhuql6pH7h4GessYhHAihy7wUIfG833lWOPkQICope0oHaHETM35ybQmEbpsd6DKzs3ohLTKFa7hFjw0THSwMcJY0YajU_QeiSedTFRODgP6hkNhBUqoKfIChSsQ",
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImVjMjU2In0.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.AWjc9Ul7WjDQ-iKjeBNimqvFW___-RUOTkRGShXyjyohB8vsaeXLpY1d2G8KqfdT6hV30q85oFeQ46e0CevghA",
    "eyJhbGciOiJFUzM4NCIsImtpZCI6ImVjMzg0In0.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.HikE4hPnvxOkn2Ih_asX92l4Y-ir0URwybssZtjI9GY4RFQQY7Op8BOoFhVDnYYfUUR13W_zmzU0Ztiysu-_2nO94WcNc5F_AB_Ktossdrk6Ph30e1sJhG6v3hpyO_Q5",
    "eyJhbGciOiJFZERTQSIsImtpZCI6ImVkIn0.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.VN7F8sx3Kc7QquiAR7z1G7143AnhZptCLO_M4l49hzIZeNao_uz4ZYJ7xxyF8YR_5U9wq5UN6XW1VRy9jpFoDg",
    "eyJhbGciOiJIUzI1NiIsImtpZCI6ImhzIn0.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.wgJg2hq92Ggjv82LgfDCjxl21yeaPuaiTu-r96_Sg_4",
];

/// Unpadded base64url.
pub fn b64u(b: &[u8]) -> String {
    b64_encode(b).trim_end_matches('=').replace('+', "-").replace('/', "_")
}
