{{- /* The scheme of every node's gRPC URL. */}}
{{- define "dci.scheme" -}}
{{ if .Values.tls.secret }}https{{ else }}http{{ end }}
{{- end }}

{{- /* A node's TLS flags (after its other args, each preceded by a comma), from the Secret's
files mounted at /tls. */}}
{{- define "dci.tlsArgs" -}}
{{- if .Values.tls.secret -}}
, "--tls-cert", "/tls/tls.crt", "--tls-key", "/tls/tls.key", "--tls-ca", "/tls/ca.crt"
{{- if .Values.tls.mutual }}, "--tls-client-ca", "/tls/ca.crt"
{{- range $api, $names := .Values.tls.allow }}{{ if $names }}, "--tls-allow-{{ $api }}", {{ join "," $names | quote }}{{ end }}{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{- /* The metrics port's flag: /metrics, and /healthz for the probes, plain HTTP even when gRPC
is TLS (Kubernetes' gRPC probes cannot speak TLS). */}}
{{- define "dci.metricsArgs" -}}
"--metrics-listen", "0.0.0.0:{{ .Values.metricsPort }}"
{{- end }}

{{- define "dci.probe" -}}
httpGet: {path: /healthz, port: metrics}
{{- end }}

{{- /* Prometheus' conventional scrape annotations. */}}
{{- define "dci.podAnnotations" -}}
annotations: {prometheus.io/scrape: "true", prometheus.io/port: "{{ .Values.metricsPort }}", prometheus.io/path: /metrics}
{{- end }}
