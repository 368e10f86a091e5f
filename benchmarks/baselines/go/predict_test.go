package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/valyala/fasthttp"
)

func testService(t *testing.T) *service {
	t.Helper()
	path := filepath.Join(t.TempDir(), "table.csv")
	rows := "entity_id,alpha,beta\nstrong,1000000,1\nweak,1,1000000\nmid,50,50\n"
	if err := os.WriteFile(path, []byte(rows), 0o600); err != nil {
		t.Fatal(err)
	}
	tbl, err := loadTable(path)
	if err != nil {
		t.Fatal(err)
	}
	return newService(tbl, limits{priorAlpha: 1, priorBeta: 1, maxCandidates: 5, maxBodyBytes: 1 << 20})
}

func call(s *service, method, path, contentType, body string) *fasthttp.RequestCtx {
	var ctx fasthttp.RequestCtx
	ctx.Request.Header.SetMethod(method)
	ctx.Request.SetRequestURI(path)
	if contentType != "" {
		ctx.Request.Header.SetContentType(contentType)
	}
	ctx.Request.SetBodyString(body)
	s.handle(&ctx)
	return &ctx
}

func TestPredictRanksDedupesAndReproduces(t *testing.T) {
	s := testService(t)
	body := `{"user_id":"u1","candidates":["weak","strong","nope","strong","mid"],"top_k":10,"seed":9}`
	ctx := call(s, "POST", "/predict", "application/json", body)
	if ctx.Response.StatusCode() != 200 {
		t.Fatalf("status %d: %s", ctx.Response.StatusCode(), ctx.Response.Body())
	}
	var got predictResponse
	if err := json.Unmarshal(ctx.Response.Body(), &got); err != nil {
		t.Fatal(err)
	}
	// Four distinct candidates; top_k is capped at them; "strong" is certain to win and "weak" to lose.
	if got.UserID != "u1" || len(got.IDs) != 4 || len(got.Scores) != 4 || got.IDs[0] != "strong" || got.IDs[3] != "weak" {
		t.Fatalf("unexpected answer %+v", got)
	}
	for i := 1; i < len(got.Scores); i++ {
		if got.Scores[i] > got.Scores[i-1] {
			t.Fatalf("scores not descending: %v", got.Scores)
		}
	}
	again := call(s, "POST", "/predict", "application/json; charset=utf-8", body)
	if string(again.Response.Body()) != string(ctx.Response.Body()) {
		t.Fatalf("the same seed answered differently:\n%s\n%s", ctx.Response.Body(), again.Response.Body())
	}
}

func TestErrors(t *testing.T) {
	s := testService(t)
	cases := []struct {
		method, path, contentType, body string
		status                          int
		code, field                     string
	}{
		{"POST", "/predict", "text/plain", `{}`, 415, "unsupported_media_type", ""},
		{"POST", "/predict", "application/json", `{"user_id":`, 400, "malformed_json", ""},
		{"POST", "/predict", "application/json", `{"user_id":"u","candidates":[NaN]}`, 400, "malformed_json", ""},
		{"POST", "/predict", "application/json", `[1]`, 422, "validation_error", ""},
		{"POST", "/predict", "application/json", `{"candidates":["a"]}`, 422, "validation_error", "user_id"},
		{"POST", "/predict", "application/json", `{"user_id":"u","candidates":[]}`, 422, "validation_error", "candidates"},
		{"POST", "/predict", "application/json", `{"user_id":"u","candidates":["a",5]}`, 422, "validation_error", "candidates"},
		{"POST", "/predict", "application/json", `{"user_id":"u","candidates":["a","b","c","d","e","f"]}`, 422, "validation_error", "candidates"},
		{"POST", "/predict", "application/json", `{"user_id":"u","candidates":["a"],"top_k":0}`, 422, "validation_error", "top_k"},
		{"POST", "/predict", "application/json", `{"user_id":"u","candidates":["a"],"seed":-1}`, 422, "validation_error", "seed"},
		{"GET", "/predict", "", "", 405, "method_not_allowed", ""},
		{"GET", "/nowhere", "", "", 404, "not_found", ""},
	}
	for _, c := range cases {
		ctx := call(s, c.method, c.path, c.contentType, c.body)
		var got errorBody
		if err := json.Unmarshal(ctx.Response.Body(), &got); err != nil {
			t.Fatalf("%s %s %s: %v", c.method, c.path, c.body, err)
		}
		if ctx.Response.StatusCode() != c.status || got.Error != c.code || got.Field != c.field {
			t.Errorf("%s %s %s: %d %+v, want %d %s field %q", c.method, c.path, c.body,
				ctx.Response.StatusCode(), got, c.status, c.code, c.field)
		}
	}
}

// BenchmarkPredict measures one /predict call in-process, without the network, on the workload's table
// and bodies: MAB_GO_BENCH_DIR must hold the table.csv and W400.jsonl that
// `python -m benchmarks.workload --out DIR` writes.
func BenchmarkPredict(b *testing.B) {
	dir := os.Getenv("MAB_GO_BENCH_DIR")
	if dir == "" {
		b.Skip("MAB_GO_BENCH_DIR is not set")
	}
	tbl, err := loadTable(filepath.Join(dir, "table.csv"))
	if err != nil {
		b.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "W400.jsonl"))
	if err != nil {
		b.Fatal(err)
	}
	bodies := bytes.Split(bytes.TrimSpace(raw), []byte("\n"))
	s := newService(tbl, limits{priorAlpha: 1, priorBeta: 1, maxCandidates: 10000, maxBodyBytes: 1 << 20})
	var ctx fasthttp.RequestCtx
	ctx.Request.Header.SetMethod("POST")
	ctx.Request.SetRequestURI("/predict")
	ctx.Request.Header.SetContentType("application/json")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ctx.Request.SetBodyRaw(bodies[i%len(bodies)])
		ctx.Response.Reset()
		s.handle(&ctx)
		if ctx.Response.StatusCode() != 200 {
			b.Fatalf("status %d: %s", ctx.Response.StatusCode(), ctx.Response.Body())
		}
	}
}
