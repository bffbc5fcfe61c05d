"""playground.py - the page `smallmind serve` shows at /: a prompt box (completion mode) or a
conversation (chat mode), the sampling parameters, and a stop button; answers stream in as
the server sends them. One self-contained HTML page, no external assets; it talks to the same
/v1 routes as any client (with the API key typed in its key box, when the server needs one)."""

PLAYGROUND = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>smallmind playground</title><meta name="viewport" content="width=device-width">
<style>
body{font-family:system-ui,sans-serif;max-width:52em;margin:1.5em auto;padding:0 1em;color:#222}
textarea{width:100%;height:6em;box-sizing:border-box;font:inherit}
pre{white-space:pre-wrap;background:#f4f4f4;padding:1em;min-height:3em}
fieldset{border:1px solid #ccc;margin:.6em 0}label{margin-right:1em;white-space:nowrap}
input[type=number]{width:5em}.msg{margin:.3em 0}.user{color:#036}.assistant{color:#222}
#err{color:#b00}button{font:inherit;padding:.2em .9em}
</style></head><body>
<h1>smallmind playground</h1>
<fieldset><legend>mode</legend>
<label><input type="radio" name="mode" id="mode-complete" value="complete" checked> completion</label>
<label><input type="radio" name="mode" id="mode-chat" value="chat"> chat</label>
<label>API key <input id="key" type="password" size="16"></label></fieldset>
<fieldset><legend>parameters</legend>
<label>max tokens <input id="max_tokens" type="number" value="200" min="0"></label>
<label>temperature <input id="temperature" type="number" step="0.1" value="0.8" min="0"></label>
<label>top p <input id="top_p" type="number" step="0.05" value="1" min="0.01" max="1"></label>
<label>top k <input id="top_k" type="number" value="0" min="0"></label>
<label>seed <input id="seed" type="number" placeholder="random"></label>
<label>stop <input id="stop" size="6" placeholder="none"></label></fieldset>
<div id="chat" hidden></div>
<textarea id="prompt">The </textarea><br>
<button id="go">Generate</button> <button id="stopbtn" disabled>Stop</button>
<button id="clear">Clear</button> <span id="status"></span>
<pre id="out"></pre><div id="err"></div>
<script>
const $=id=>document.getElementById(id);let ctl=null,history=[];
function mode(){return $('mode-chat').checked?'chat':'complete'}
function params(){const p={max_tokens:+$('max_tokens').value,temperature:+$('temperature').value,
 top_p:+$('top_p').value,top_k:+$('top_k').value,stream:true};
 if($('seed').value!=='')p.seed=+$('seed').value;if($('stop').value!=='')p.stop=$('stop').value;return p}
function show(){const c=$('chat');c.innerHTML='';for(const m of history){const d=document.createElement('div');
 d.className='msg '+m.role;d.textContent=(m.role==='user'?'you: ':'model: ')+m.content;c.appendChild(d)}}
for(const r of ['mode-complete','mode-chat'])$(r).onchange=()=>{$('chat').hidden=mode()!=='chat';
 $('go').textContent=mode()==='chat'?'Send':'Generate';$('prompt').value=mode()==='chat'?'':'The '};
$('clear').onclick=()=>{history=[];show();$('out').textContent='';$('err').textContent=''};
$('stopbtn').onclick=()=>{if(ctl)ctl.abort()};
$('go').onclick=async()=>{const chat=mode()==='chat',body=params(),text=$('prompt').value;
 if(chat){history.push({role:'user',content:text});body.messages=history;show();$('prompt').value=''}
 else body.prompt=text;
 $('out').textContent='';$('err').textContent='';$('status').textContent='generating...';
 $('go').disabled=true;$('stopbtn').disabled=false;ctl=new AbortController();let answer='';
 const headers={'Content-Type':'application/json'};if($('key').value)headers.Authorization='Bearer '+$('key').value;
 try{const r=await fetch(chat?'/v1/chat/completions':'/v1/completions',{method:'POST',headers,
  body:JSON.stringify(body),signal:ctl.signal});
  if(!r.ok){$('err').textContent=(await r.json()).error.message;return}
  const rd=r.body.getReader(),dec=new TextDecoder();let buf='';
  for(;;){const {done,value}=await rd.read();if(done)break;buf+=dec.decode(value,{stream:true});
   let i;while((i=buf.indexOf('\\n\\n'))>=0){const ev=buf.slice(0,i);buf=buf.slice(i+2);
    const d=ev.replace(/^data: /,'');if(d==='[DONE]')continue;const o=JSON.parse(d);
    if(o.error){$('err').textContent=o.error.message;continue}
    if(!o.choices.length)continue;const c=o.choices[0];
    answer+=chat?(c.delta.content||''):c.text;$('out').textContent=answer}}}
 catch(e){if(e.name!=='AbortError')$('err').textContent=String(e)}
 finally{if(chat){history.push({role:'assistant',content:answer});show()}
  $('status').textContent=ctl&&ctl.signal.aborted?'stopped':'done';$('go').disabled=false;
  $('stopbtn').disabled=true;ctl=null}};
</script></body></html>"""
